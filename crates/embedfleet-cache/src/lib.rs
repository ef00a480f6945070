//! The two-tier vector cache of embedfleet: a byte-bounded in-process LRU in front of Redis.
//!
//! Both fused vectors and per-model partials are cached, so a request for another subset of
//! models still reuses the partials it shares with earlier requests. The in-process tier answers
//! repeated inputs without a network round trip; Redis shares results across coordinator
//! processes and restarts. Redis is an optimisation, never a dependency: when it is down or slow
//! the cache degrades to the in-process tier, logs the outage once, and goes back to Redis when
//! it answers again (see [`redis_tier`]).
//!
//! # Layout
//!
//! - [`cache`]: [`VectorCache`], the two tiers behind `get_many` / `put_many`.
//! - [`config`]: [`CacheConfig`], every knob documented, serde + `Default`.
//! - [`key`]: [`CacheKey`], the namespaced key scheme (`embedfleet:v1:{kind}:{content-key}`).
//! - [`codec`]: the binary value format (one header byte, then little-endian f32 or f16).
//! - [`lru`]: [`ByteBoundedLru`], the in-process tier, bounded by bytes rather than entries.
//! - `redis_connect`: how the Redis tier authenticates (AUTH from the URL or a secret file) and
//!   speaks TLS (`rediss://`, a private CA, client certificates).
//! - [`redis_tier`]: the Redis tier: batched MGET / pipelined SET, per-call timeout, outage
//!   tracking and back-off.
//! - [`stats`]: [`CacheStats`], counters for metrics.
//! - [`error`]: [`CacheError`], the one error type.
//!
//! # Example
//!
//! ```no_run
//! use embedfleet_cache::{CacheConfig, CacheKey, VectorCache};
//! use embedfleet_proto::{ContentKey, Input, InputType};
//!
//! # async fn demo() -> Result<(), embedfleet_cache::CacheError> {
//! let cache = VectorCache::connect(CacheConfig {
//!     redis_url: Some("redis://127.0.0.1:6379".into()),
//!     ..CacheConfig::default()
//! })
//! .await?;
//! let content =
//!     ContentKey::new(&Input::Text("hello".into()), None, InputType::Document, "minilm", "rev1");
//! let key = CacheKey::partial("minilm", "rev1", &content);
//! cache.put_many(&[(key.clone(), &[0.1, 0.2, 0.3][..])]).await;
//! assert_eq!(cache.get_many(&[key]).await[0].as_deref(), Some(&[0.1, 0.2, 0.3][..]));
//! # Ok(())
//! # }
//! ```
//!
//! The design notes (key scheme, value format, outage behaviour, configuration) are in
//! `docs/cache.md`.

pub mod cache;
pub mod codec;
pub mod config;
pub mod error;
pub mod key;
pub mod lru;
mod redis_connect;
pub mod redis_tier;
pub mod stats;

pub use cache::VectorCache;
pub use codec::ElementType;
pub use config::{CacheConfig, DEFAULT_TTL_SECS};
pub use error::CacheError;
pub use key::CacheKey;
pub use lru::ByteBoundedLru;
pub use stats::CacheStats;
