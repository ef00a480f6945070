//! [`VectorCache`]: the in-process tier in front of the Redis tier, behind a batch API that
//! never fails a request.
//!
//! A lookup asks the in-process LRU first, then Redis for all of the LRU's misses in one `MGET`,
//! and copies what Redis had into the LRU. A write goes to both, the Redis part as one pipeline.
//! Both take a whole batch because the coordinator looks up every input of a request (and every
//! model's partial of it) at once, and one round trip for the batch is what keeps a warm request
//! under a millisecond.

use std::sync::Arc;
use std::time::Duration;

use crate::codec::{self, ElementType};
use crate::lru::ByteBoundedLru;
use crate::redis_tier::RedisTier;
use crate::stats::Counter;
use crate::{CacheConfig, CacheError, CacheKey, CacheStats};

/// How long [`VectorCache::connect`] waits for Redis to answer its first `PING`. Longer than a
/// call's timeout because the first call also connects; start-up is not on a request's path.
const STARTUP_PING_WAIT: Duration = Duration::from_secs(1);

/// The two-tier vector cache. Share it between tasks behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct VectorCache {
    lru: ByteBoundedLru,
    /// `None` when no `redis_url` is configured: in-process only.
    redis: Option<RedisTier>,
    element_type: ElementType,
    lru_hits: Counter,
    redis_hits: Counter,
    misses: Counter,
    corrupt_values: Counter,
}

impl VectorCache {
    /// Builds the cache from `config`. With a `redis_url` it checks once (bounded, about a
    /// second at most) that Redis answers and logs either way; an unreachable Redis is not an
    /// error, the cache then starts in an outage and picks Redis up when it answers. Without a
    /// `redis_url` it says once that it runs in-process only.
    ///
    /// Errors for a bad configuration, a `redis_url` that does not parse, a secret or TLS file
    /// that cannot be read, and a Redis that answers but refuses the credentials or the TLS
    /// handshake ([`CacheError::RedisRefused`]). Must run in a Tokio runtime when a `redis_url`
    /// is given.
    pub async fn connect(config: CacheConfig) -> Result<Self, CacheError> {
        config.validate()?;
        let redis = match &config.redis_url {
            Some(url) => Some(RedisTier::new(url, &config)?),
            None => None,
        };
        let cache = VectorCache {
            lru: ByteBoundedLru::new(config.lru_bytes),
            redis,
            element_type: config.element_type(),
            lru_hits: Counter::default(),
            redis_hits: Counter::default(),
            misses: Counter::default(),
            corrupt_values: Counter::default(),
        };
        match &cache.redis {
            None => tracing::info!(
                lru_bytes = config.lru_bytes,
                "no redis_url configured: the vector cache is in-process only"
            ),
            Some(redis) => {
                redis.ping(STARTUP_PING_WAIT).await?;
                if !redis.is_down() {
                    tracing::info!(
                        redis = redis.url_for_logs(),
                        lru_bytes = config.lru_bytes,
                        ttl_secs = config.ttl_secs,
                        f16 = config.f16,
                        "vector cache: in-process LRU in front of redis"
                    );
                }
                // On failure the tier has already logged the outage once.
            }
        }
        Ok(cache)
    }

    /// The cached vector of each key, in order, `None` for a miss. The in-process tier answers
    /// first; all of its misses go to Redis in one `MGET`. Never fails: a Redis error or timeout
    /// makes its keys misses (see [`crate::redis_tier`]), and a value that does not decode is a
    /// miss and a `warn` line.
    pub async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Vec<f32>>> {
        let mut found: Vec<Option<Vec<f32>>> = keys
            .iter()
            .map(|key| {
                let bytes = self.lru.get(key)?;
                self.decode_or_log(key, &bytes, "in-process")
            })
            .collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        self.lru_hits.add((keys.len() - missing.len()) as u64);
        if missing.is_empty() {
            return found;
        }

        let mut redis_hits = 0u64;
        if let Some(redis) = &self.redis {
            let missing_keys: Vec<&CacheKey> = missing.iter().map(|&i| &keys[i]).collect();
            if let Some(values) = redis.get_many(&missing_keys).await {
                for (&i, value) in missing.iter().zip(values) {
                    let Some(bytes) = value else { continue };
                    if let Some(vector) = self.decode_or_log(&keys[i], &bytes, "redis") {
                        self.lru.insert(keys[i].clone(), Arc::from(bytes));
                        found[i] = Some(vector);
                        redis_hits += 1;
                    }
                }
            }
        }
        self.redis_hits.add(redis_hits);
        self.misses.add(missing.len() as u64 - redis_hits);
        found
    }

    /// Stores each vector under its key in both tiers, the Redis part as one pipeline (with the
    /// configured TTL). Never fails: a Redis error is counted and logged as an outage. Empty
    /// vectors are not stored (no model produces one, and the value format reads a header-only
    /// value as corrupt).
    pub async fn put_many(&self, entries: &[(CacheKey, &[f32])]) {
        let encoded: Vec<(&CacheKey, Arc<[u8]>)> = entries
            .iter()
            .filter(|(key, vector)| {
                if vector.is_empty() {
                    tracing::warn!(%key, "not caching an empty vector");
                }
                !vector.is_empty()
            })
            .map(|(key, vector)| (key, Arc::from(codec::encode(vector, self.element_type))))
            .collect();
        for (key, bytes) in &encoded {
            self.lru.insert((*key).clone(), Arc::clone(bytes));
        }
        if let Some(redis) = &self.redis {
            let writes: Vec<(&CacheKey, &[u8])> = encoded
                .iter()
                .map(|(key, bytes)| (*key, &bytes[..]))
                .collect();
            redis.put_many(&writes).await;
        }
    }

    /// [`Self::get_many`] for one key.
    pub async fn get(&self, key: &CacheKey) -> Option<Vec<f32>> {
        self.get_many(std::slice::from_ref(key))
            .await
            .pop()
            .flatten()
    }

    /// [`Self::put_many`] for one entry.
    pub async fn put(&self, key: CacheKey, vector: &[f32]) {
        self.put_many(&[(key, vector)]).await;
    }

    /// The in-process tier, for inspection (its size, its bound).
    pub fn lru(&self) -> &ByteBoundedLru {
        &self.lru
    }

    /// The element type values are written with (f32, or f16 when configured).
    pub fn element_type(&self) -> ElementType {
        self.element_type
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let redis = self.redis.as_ref();
        CacheStats {
            lru_hits: self.lru_hits.get(),
            redis_hits: self.redis_hits.get(),
            misses: self.misses.get(),
            corrupt_values: self.corrupt_values.get(),
            redis_errors: redis.map_or(0, RedisTier::errors),
            redis_skipped: redis.map_or(0, RedisTier::skipped),
            redis_outages: redis.map_or(0, RedisTier::outages),
            redis_configured: redis.is_some(),
            redis_down: redis.is_some_and(RedisTier::is_down),
            lru_bytes: self.lru.used_bytes(),
            lru_entries: self.lru.len(),
            lru_evictions: self.lru.evictions(),
        }
    }

    fn decode_or_log(&self, key: &CacheKey, bytes: &[u8], tier: &str) -> Option<Vec<f32>> {
        match codec::decode(bytes) {
            Ok(vector) => Some(vector),
            Err(error) => {
                self.corrupt_values.incr();
                tracing::warn!(%key, tier, %error, "cached value does not decode; treating it as a miss");
                None
            }
        }
    }
}
