//! The cache against a real redis-server: round trips in both element types, batched lookups,
//! the byte bound, TTLs and corrupt values.

mod support;

use std::time::Duration;

use embedfleet_cache::{CacheConfig, CacheError, CacheKey, VectorCache, DEFAULT_TTL_SECS};
use embedfleet_testkit::RedisServer;
use support::{command_calls, key, raw, raw_get, raw_set, vector, LogCapture};

const DIM: usize = 384;

fn config(redis: &RedisServer) -> CacheConfig {
    CacheConfig {
        redis_url: Some(redis.url()),
        // Generous: the machine may be busy, and these tests are not about outages.
        redis_timeout_ms: 2_000,
        ..CacheConfig::default()
    }
}

async fn cache(config: CacheConfig) -> VectorCache {
    VectorCache::connect(config).await.expect("cache")
}

#[tokio::test]
async fn f32_vectors_round_trip_exactly_through_redis() {
    let redis = RedisServer::start().expect("redis-server");
    let writer = cache(config(&redis)).await;
    let v = vector(1, DIM);
    writer.put(key(1), &v).await;

    // The stored value follows the documented format under the documented key.
    let stored = raw_get(&mut raw(&redis.url()).await, &key(1))
        .await
        .expect("stored");
    assert_eq!(stored[0], 0x10);
    assert_eq!(stored.len(), 1 + 4 * DIM);
    assert!(key(1).as_str().starts_with("embedfleet:v1:p:minilm:rev1:"));

    // A second process (an empty in-process tier) reads it from Redis, then from its LRU.
    let reader = cache(config(&redis)).await;
    assert_eq!(reader.get(&key(1)).await, Some(v.clone()));
    assert_eq!(reader.get(&key(1)).await, Some(v));
    let stats = reader.stats();
    assert_eq!((stats.redis_hits, stats.lru_hits, stats.misses), (1, 1, 0));
    assert_eq!(stats.redis_errors, 0);
}

#[tokio::test]
async fn f16_vectors_round_trip_within_1e_3() {
    let redis = RedisServer::start().expect("redis-server");
    let f16 = CacheConfig {
        f16: true,
        ..config(&redis)
    };
    let writer = cache(f16.clone()).await;
    let v = vector(2, DIM);
    writer.put(key(2), &v).await;
    let stored = raw_get(&mut raw(&redis.url()).await, &key(2))
        .await
        .expect("stored");
    assert_eq!(stored[0], 0x11);
    assert_eq!(stored.len(), 1 + 2 * DIM);

    // Both the writer's in-process copy and a fresh reader (f32-configured: it reads either
    // format) see the same f16-rounded numbers.
    let from_lru = writer.get(&key(2)).await.expect("lru hit");
    let reader = cache(config(&redis)).await;
    let from_redis = reader.get(&key(2)).await.expect("redis hit");
    assert_eq!(from_lru, from_redis);
    for (a, b) in v.iter().zip(&from_redis) {
        assert!((a - b).abs() <= 1e-3, "{a} vs {b}");
    }
}

#[tokio::test]
async fn a_batch_with_mixed_hits_and_misses_takes_one_mget() {
    let redis = RedisServer::start().expect("redis-server");
    let mut conn = raw(&redis.url()).await;
    let other_process = cache(config(&redis)).await;
    let entries: Vec<(CacheKey, Vec<f32>)> = (0..4).map(|i| (key(i), vector(i, DIM))).collect();
    let refs: Vec<(CacheKey, &[f32])> = entries.iter().map(|(k, v)| (k.clone(), &v[..])).collect();
    other_process.put_many(&refs).await;

    let this_process = cache(config(&redis)).await;
    this_process
        .put_many(&[(key(4), &vector(4, DIM)[..]), (key(5), &vector(5, DIM)[..])])
        .await;

    let mgets_before = command_calls(&mut conn, "mget").await;
    let lookup = [key(0), key(4), key(9), key(1), key(5), key(8)];
    let found = this_process.get_many(&lookup).await;
    assert_eq!(command_calls(&mut conn, "mget").await, mgets_before + 1);

    let expected = [Some(0), Some(4), None, Some(1), Some(5), None];
    for (got, want) in found.iter().zip(expected) {
        assert_eq!(got.as_ref(), want.map(|i| vector(i, DIM)).as_ref());
    }
    let stats = this_process.stats();
    assert_eq!((stats.lru_hits, stats.redis_hits, stats.misses), (2, 2, 2));

    // All in the LRU now (Redis hits are copied in): no MGET at all.
    let found = this_process.get_many(&[key(0), key(4)]).await;
    assert!(found.iter().all(Option::is_some));
    assert_eq!(command_calls(&mut conn, "mget").await, mgets_before + 1);
}

#[tokio::test]
async fn the_in_process_tier_never_holds_more_than_its_bytes() {
    let redis = RedisServer::start().expect("redis-server");
    let entry_bytes = key(0).as_str().len() + 1 + 4 * DIM;
    let bound = 10 * entry_bytes + entry_bytes / 2;
    let cache = cache(CacheConfig {
        lru_bytes: bound,
        ..config(&redis)
    })
    .await;
    for i in 0..50 {
        cache.put(key(i), &vector(i, DIM)).await;
        assert!(
            cache.lru().used_bytes() <= bound,
            "over the bound after {i}"
        );
    }
    let stats = cache.stats();
    assert_eq!(stats.lru_entries, 10);
    assert_eq!(stats.lru_evictions, 40);
    assert!(stats.lru_bytes <= bound);

    // Evicted entries are still in Redis; the most recent ones are in the LRU.
    assert_eq!(cache.get(&key(0)).await, Some(vector(0, DIM)));
    assert_eq!(cache.get(&key(49)).await, Some(vector(49, DIM)));
    let stats = cache.stats();
    assert_eq!((stats.redis_hits, stats.lru_hits), (1, 1));
    assert!(cache.lru().used_bytes() <= bound);
}

#[tokio::test]
async fn values_carry_the_configured_ttl() {
    let redis = RedisServer::start().expect("redis-server");
    let mut conn = raw(&redis.url()).await;
    let ttl = |key: CacheKey| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("TTL")
                .arg(key.as_str())
                .query_async::<i64>(&mut conn)
                .await
                .expect("TTL")
        }
    };

    let expiring = cache(CacheConfig {
        ttl_secs: Some(30),
        ..config(&redis)
    })
    .await;
    expiring
        .put_many(&[(key(1), &vector(1, 8)[..]), (key(2), &vector(2, 8)[..])])
        .await;
    for k in [key(1), key(2)] {
        let left = ttl(k).await;
        assert!((1..=30).contains(&left), "TTL {left}");
    }

    // The default: entries of retired revisions leave Redis by themselves.
    let default = cache(config(&redis)).await;
    default.put(key(5), &vector(5, 8)).await;
    let left = ttl(key(5)).await;
    assert!(
        (DEFAULT_TTL_SECS as i64 - 60..=DEFAULT_TTL_SECS as i64).contains(&left),
        "TTL {left}"
    );

    let forever = cache(CacheConfig {
        ttl_secs: None,
        ..config(&redis)
    })
    .await;
    forever.put(key(3), &vector(3, 8)).await;
    assert_eq!(ttl(key(3)).await, -1, "no TTL asked for, no expiry");

    // And a value really expires (1 s is the shortest TTL Redis takes in seconds).
    let short = cache(CacheConfig {
        ttl_secs: Some(1),
        ..config(&redis)
    })
    .await;
    short.put(key(4), &vector(4, 8)).await;
    assert!(raw_get(&mut conn, &key(4)).await.is_some());
    let gone = support::eventually(Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move { raw_get(&mut conn, &key(4)).await.is_none() }
    })
    .await;
    assert!(gone, "value with a 1 s TTL still there after 5 s");
}

#[tokio::test(flavor = "current_thread")]
async fn a_corrupt_value_in_redis_is_a_logged_miss() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let redis = RedisServer::start().expect("redis-server");
    let mut conn = raw(&redis.url()).await;
    let good = embedfleet_cache::codec::encode(&vector(3, DIM), embedfleet_cache::ElementType::F32);
    raw_set(&mut conn, &key(1), b"not a vector").await;
    raw_set(&mut conn, &key(2), &good[..good.len() - 3]).await; // truncated
    raw_set(&mut conn, &key(3), &good).await;

    let cache = cache(config(&redis)).await;
    let found = cache.get_many(&[key(1), key(2), key(3)]).await;
    assert_eq!(found, vec![None, None, Some(vector(3, DIM))]);
    let stats = cache.stats();
    assert_eq!(
        (stats.corrupt_values, stats.misses, stats.redis_hits),
        (2, 2, 1)
    );
    assert_eq!(
        logs.count("cached value does not decode"),
        2,
        "{}",
        logs.text()
    );
    assert_eq!(
        cache.lru().len(),
        1,
        "corrupt values must not enter the LRU"
    );

    // Recomputing and storing the vector repairs the entry.
    cache.put(key(1), &vector(1, DIM)).await;
    let fresh = VectorCache::connect(config(&redis)).await.expect("cache");
    assert_eq!(fresh.get(&key(1)).await, Some(vector(1, DIM)));
}

#[tokio::test(flavor = "current_thread")]
async fn without_a_redis_url_the_cache_is_in_process_only_and_says_so_once() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let cache = VectorCache::connect(CacheConfig::default())
        .await
        .expect("cache");
    cache.put(key(1), &vector(1, DIM)).await;
    assert_eq!(
        cache.get_many(&[key(1), key(2)]).await,
        vec![Some(vector(1, DIM)), None]
    );
    let stats = cache.stats();
    assert!(!stats.redis_configured);
    assert_eq!(
        (stats.lru_hits, stats.misses, stats.redis_errors),
        (1, 1, 0)
    );
    assert_eq!(logs.count("in-process only"), 1, "{}", logs.text());
}

#[tokio::test]
async fn a_malformed_redis_url_is_a_config_error() {
    let result = VectorCache::connect(CacheConfig {
        redis_url: Some("not a url".into()),
        ..CacheConfig::default()
    })
    .await;
    assert!(
        matches!(result, Err(CacheError::InvalidRedisUrl { .. })),
        "{result:?}"
    );
}
