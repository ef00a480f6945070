//! Vector cache lookups: one fused 1536-d vector and a batch of 32, every key a hit, from
//!
//! - the in-process LRU (no Redis configured), and
//! - Redis alone, a round trip on loopback (`lru_bytes: 0`, a real `redis-server` started by
//!   `embedfleet-testkit`), one `MGET` per lookup,
//!
//! each with values stored as f32 and as f16 (half the bytes, a conversion on the way out).
//! These are the cache's share of a warm request; the coordinator bench measures the whole warm
//! round trip. Group `cache_lookup`, ids `<lru|redis>/<f32|f16>/get/<batch>`. Specification
//! target: a cache hit < 100 µs. Run: `cargo bench -p embedfleet-benches --bench cache`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use embedfleet_benches::unit_vector;
use embedfleet_cache::{CacheConfig, CacheKey, VectorCache};
use embedfleet_proto::{ContentKey, Input};
use embedfleet_testkit::RedisServer;

/// Width of the fused embedding.
const FUSED_DIM: usize = 1536;
const BATCHES: [usize; 2] = [1, 32];

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    // One thread, like a coordinator task awaiting its lookup; Redis' connection task runs on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));

    let keys: Vec<CacheKey> = (0..BATCHES[1])
        .map(|i| {
            let input = Input::Text(format!("cache bench input {i}"));
            CacheKey::fused(
                "fusemoe-bench",
                &ContentKey::new(
                    &input,
                    None,
                    embedfleet_proto::InputType::Document,
                    "minilm+mpnet:normalized",
                    "rev+rev",
                ),
            )
        })
        .collect();
    let vectors: Vec<Vec<f32>> = (0..keys.len())
        .map(|i| unit_vector(FUSED_DIM, i as u64))
        .collect();

    for f16 in [false, true] {
        let element = if f16 { "f16" } else { "f32" };
        let tiers = [
            (
                "lru",
                CacheConfig {
                    f16,
                    ..CacheConfig::default()
                },
            ),
            (
                "redis",
                CacheConfig {
                    lru_bytes: 0,
                    redis_url: Some(redis.url()),
                    f16,
                    // Production's 50 ms bound turns a scheduling hiccup of a busy bench
                    // machine into an outage (every lookup a miss for a second): measured here
                    // is the round trip, not outage handling.
                    redis_timeout_ms: 2_000,
                    ..CacheConfig::default()
                },
            ),
        ];
        for (tier, config) in tiers {
            let cache = runtime
                .block_on(VectorCache::connect(config))
                .expect("cache config");
            let entries: Vec<(CacheKey, &[f32])> = keys
                .iter()
                .cloned()
                .zip(vectors.iter().map(Vec::as_slice))
                .collect();
            runtime.block_on(cache.put_many(&entries));

            let mut group = criterion.benchmark_group("cache_lookup");
            for batch in BATCHES {
                let keys = &keys[..batch];
                // Every key must hit, or the figure would be a miss's (a Redis outage, say).
                let found = runtime.block_on(cache.get_many(keys));
                assert!(
                    found.iter().all(Option::is_some),
                    "{tier}/{element}: not every key hit before the bench; cache stats: {:?}",
                    cache.stats()
                );
                group.throughput(Throughput::Elements(batch as u64));
                let id = BenchmarkId::new(format!("{tier}/{element}/get"), batch);
                group.bench_with_input(id, keys, |b, keys| {
                    b.iter(|| runtime.block_on(cache.get_many(keys)))
                });
            }
            group.finish();
            let stats = cache.stats();
            assert_eq!(
                stats.misses, 0,
                "{tier}/{element}: lookups missed during the bench: {stats:?}"
            );
        }
    }
    criterion.final_summary();
}
