//! The one error type of the cache.
//!
//! Few of these reach a caller: lookups and writes never fail a request (a Redis error becomes
//! a logged, counted outage and a bad value becomes a miss). What does reach a caller is a
//! configuration mistake at construction.

use std::time::Duration;

/// What went wrong in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// `redis_url` could not be parsed (returned by [`crate::VectorCache::connect`]).
    #[error("invalid redis_url `{url}`: {source}")]
    InvalidRedisUrl {
        /// The URL with any password masked.
        url: String,
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered the first call but refused us: a wrong or missing password, an ACL user
    /// without permission, or a TLS certificate that does not verify. Returned by
    /// [`crate::VectorCache::connect`], since no amount of waiting fixes it.
    #[error("redis at {url} refused the connection (check the user, password and TLS settings): {source}")]
    RedisRefused {
        /// The URL with any password masked.
        url: String,
        #[source]
        source: redis::RedisError,
    },
    /// The Redis tier needs a Tokio runtime for its reconnecting connection.
    #[error("the Redis tier must be created inside a Tokio runtime")]
    NoTokioRuntime,
    /// A configuration value is out of range.
    #[error("invalid cache config: {0}")]
    InvalidConfig(String),
    /// A Redis call failed (connection refused, reset, server error).
    #[error("redis call failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// A Redis call did not answer within `redis_timeout_ms`.
    #[error("redis call timed out after {0:?}")]
    RedisTimeout(Duration),
    /// A stored value does not decode: wrong header, unknown format, bad length.
    #[error("corrupt cached value: {0}")]
    CorruptValue(String),
}
