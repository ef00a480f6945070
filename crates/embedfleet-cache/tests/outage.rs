//! Redis outages against a real redis-server that the test kills and restarts: requests keep
//! being served from the in-process tier, the outage is logged once and counted, and Redis is
//! used again once it answers, without restarting anything.

mod support;

use std::time::{Duration, Instant};

use embedfleet_cache::{codec, CacheConfig, ElementType, VectorCache};
use embedfleet_testkit::RedisServer;
use support::{eventually, key, raw, raw_get, raw_set, vector, LogCapture};

const DIM: usize = 64;
/// How long a recovered Redis may take to be used again: a few back-off windows plus slack for
/// a busy machine.
const RECOVERY_LIMIT: Duration = Duration::from_secs(15);
/// Far above the 50 ms call timeout; a call that takes this long means something waits
/// unbounded.
const SLOW_CALL: Duration = Duration::from_secs(1);

fn outage_config(redis: &RedisServer) -> CacheConfig {
    CacheConfig {
        redis_url: Some(redis.url()),
        redis_timeout_ms: 50,
        redis_retry_ms: 100,
        ..CacheConfig::default()
    }
}

/// Polls until a value written through `cache` shows up in Redis.
async fn writes_reach_redis(cache: &VectorCache, url: &str, probe_base: usize) -> bool {
    let mut attempt = probe_base;
    eventually(RECOVERY_LIMIT, || {
        attempt += 1;
        let probe = attempt;
        async move {
            cache.put(key(probe), &vector(probe, DIM)).await;
            raw_get(&mut raw(url).await, &key(probe)).await.is_some()
        }
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn a_redis_outage_is_served_from_memory_logged_once_and_recovered() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let mut redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let cache = VectorCache::connect(outage_config(&redis))
        .await
        .expect("cache");
    cache.put(key(1), &vector(1, DIM)).await;
    assert!(raw_get(&mut raw(&url).await, &key(1)).await.is_some());

    redis.stop().expect("stop redis");
    for i in 100..140 {
        let started = Instant::now();
        cache.put(key(i), &vector(i, DIM)).await;
        let found = cache.get_many(&[key(1), key(i), key(9_999)]).await;
        assert!(
            started.elapsed() < SLOW_CALL,
            "call {i} took {:?}",
            started.elapsed()
        );
        assert_eq!(
            found,
            vec![Some(vector(1, DIM)), Some(vector(i, DIM)), None]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = cache.stats();
    assert!(during.redis_down);
    assert!(during.redis_errors >= 1, "{during:?}");
    assert!(
        during.redis_skipped >= 1,
        "back-off should skip calls: {during:?}"
    );
    assert_eq!(during.redis_outages, 1);
    assert_eq!(logs.count("redis unreachable"), 1, "{}", logs.text());

    redis.restart().expect("restart redis");
    assert!(
        writes_reach_redis(&cache, &url, 1_000).await,
        "writes never reached redis again"
    );

    // Reads reach it too: a value only Redis has (written behind the cache's back).
    let only_in_redis = codec::encode(&vector(7, DIM), ElementType::F32);
    raw_set(&mut raw(&url).await, &key(7), &only_in_redis).await;
    assert_eq!(cache.get(&key(7)).await, Some(vector(7, DIM)));

    let after = cache.stats();
    assert!(!after.redis_down);
    assert!(after.redis_hits >= 1);
    assert_eq!(after.redis_outages, 1);
    assert_eq!(logs.count("redis unreachable"), 1, "{}", logs.text());
    assert_eq!(logs.count("redis answers again"), 1, "{}", logs.text());
}

#[tokio::test(flavor = "current_thread")]
async fn a_redis_down_at_start_is_picked_up_when_it_comes() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let mut redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    redis.stop().expect("stop redis");

    let started = Instant::now();
    let cache = VectorCache::connect(outage_config(&redis))
        .await
        .expect("cache");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connect waited {:?}",
        started.elapsed()
    );
    cache.put(key(1), &vector(1, DIM)).await;
    assert_eq!(cache.get(&key(1)).await, Some(vector(1, DIM)));
    assert_eq!(cache.stats().redis_outages, 1);
    assert_eq!(logs.count("redis unreachable"), 1, "{}", logs.text());

    redis.restart().expect("start redis");
    assert!(
        writes_reach_redis(&cache, &url, 1_000).await,
        "writes never reached redis"
    );
    assert_eq!(logs.count("redis answers again"), 1, "{}", logs.text());
}
