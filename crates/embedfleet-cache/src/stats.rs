//! Counters for metrics: plain atomics bumped on the request path, read as a [`CacheStats`]
//! snapshot by whoever exports them (the fleet's telemetry, a test, a bench).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of the cache's counters since it was created. Counts are per key, not per call:
/// one `get_many` of 10 keys with 3 in-process hits adds 3 to `lru_hits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CacheStats {
    /// Keys answered by the in-process tier.
    pub lru_hits: u64,
    /// Keys answered by Redis (and then copied into the in-process tier).
    pub redis_hits: u64,
    /// Keys neither tier had (including values that failed to decode, and lookups Redis could
    /// not answer during an outage).
    pub misses: u64,
    /// Values that failed to decode and were treated as misses.
    pub corrupt_values: u64,
    /// Redis calls that failed or timed out. Each is a request served without Redis.
    pub redis_errors: u64,
    /// Redis calls not attempted because an outage was in its back-off window.
    pub redis_skipped: u64,
    /// Outages: times Redis went from answering to failing (each logged once).
    pub redis_outages: u64,
    /// Whether the cache has a Redis tier at all.
    pub redis_configured: bool,
    /// Whether Redis is in an outage right now (its last call failed).
    pub redis_down: bool,
    /// Bytes held by the in-process tier.
    pub lru_bytes: usize,
    /// Entries held by the in-process tier.
    pub lru_entries: usize,
    /// Entries the in-process tier evicted to stay within its bound.
    pub lru_evictions: u64,
}

/// A monotonic counter; relaxed ordering because each is read on its own.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn add(&self, n: u64) {
        if n > 0 {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn incr(&self) {
        self.add(1);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
