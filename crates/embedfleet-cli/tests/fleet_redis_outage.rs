//! Redis going away mid-run costs the fleet its shared cache, never a request: requests keep
//! succeeding while Redis is down, and once Redis is back (empty, same port) new results are
//! written to it again, without restarting any role.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

use embedfleet_testkit::{NatsServer, RedisServer};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// `DBSIZE` over a plain connection (inline command, integer reply).
fn redis_dbsize(port: u16) -> u64 {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream.write_all(b"DBSIZE\r\n").expect("send DBSIZE");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read DBSIZE");
    line.trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected DBSIZE reply {line:?}"))
}

/// `SCAN`s for keys outside the cache's `embedfleet:` namespace; there must be none.
fn redis_foreign_keys(port: u16) -> Vec<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream.write_all(b"KEYS *\r\n").expect("send KEYS");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read KEYS");
    let count: usize = line.trim().trim_start_matches('*').parse().expect("array");
    let mut keys = Vec::new();
    for _ in 0..count {
        line.clear();
        reader.read_line(&mut line).expect("bulk length");
        line.clear();
        reader.read_line(&mut line).expect("key");
        keys.push(line.trim_end().to_owned());
    }
    keys.retain(|k| !k.starts_with("embedfleet:"));
    keys
}

/// Polls `DBSIZE` until it passes `above`, for up to `within`.
async fn wait_for_dbsize_above(port: u16, above: u64, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    loop {
        let size = redis_dbsize(port);
        if size > above {
            return Some(size);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_costs_no_request_and_redis_is_used_again_after() {
    let nats = NatsServer::start().expect("start nats-server");
    let mut redis = RedisServer::start().expect("start redis-server");
    let (url, redis_url, redis_port) = (nats.url(), redis.url(), redis.port());
    let mut serve = start_role(
        "serve",
        &[
            "serve",
            "--nats-url",
            &url,
            "--redis-url",
            &redis_url,
            "--models",
            "minilm,mpnet",
        ],
    );
    let client = client(&url).await;
    let texts = numbered_sentences("Redis outage", 60);
    let mut next = texts.iter();
    let mut ask = |client: async_nats::Client| {
        let text = next.next().expect("enough texts").clone();
        async move {
            let body = json!({ "input": text });
            let reply = request_json(&client, &body, WAIT).await.ok(&text);
            check_fused_reply(&reply, 1);
        }
    };

    // Before: results land in Redis.
    for _ in 0..5 {
        ask(client.clone()).await;
    }
    let before = wait_for_dbsize_above(redis_port, 0, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("nothing written to Redis; serve log:\n{}", serve.log()));
    assert_eq!(redis_foreign_keys(redis_port), Vec::<String>::new());

    // Outage: every request still succeeds.
    redis.stop().expect("stop redis");
    for _ in 0..20 {
        ask(client.clone()).await;
    }
    // A result cached before the outage is still served (from the in-process tier).
    let repeat = json!({ "input": texts[0] });
    let reply = request_json(&client, &repeat, WAIT)
        .await
        .ok("repeat during outage");
    check_fused_reply(&reply, 1);
    assert_all_running(&mut [&mut serve]);
    let during = service_stats(&client).await;

    // Back: Redis restarts empty on the same port; new results appear in it again.
    redis.restart().expect("restart redis");
    assert_eq!(
        redis_dbsize(redis_port),
        0,
        "a restarted Redis starts empty"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        ask(client.clone()).await;
        if let Some(size) = wait_for_dbsize_above(redis_port, 0, Duration::from_millis(500)).await {
            break size;
        }
        assert!(
            Instant::now() < deadline,
            "Redis got no new entries within 30 s of its restart; serve log:\n{}",
            serve.log()
        );
    };
    assert_all_running(&mut [&mut serve]);

    let stats = service_stats(&client).await;
    eprintln!(
        "redis keys before the outage: {before}, after the restart: {after}; \
         stats during: {during:?}; after: {stats:?}"
    );
    if let (Some(during), Some(now)) = (during.first(), stats.first()) {
        let cache = &during["cache"];
        assert_eq!(cache["redis_configured"], true, "{cache}");
        assert!(
            cache["redis_outages"].as_u64() >= Some(1),
            "the outage is counted: {cache}"
        );
        assert_eq!(now["cache"]["redis_down"], false, "{now}");
        assert_eq!(now["server_errors"].as_u64(), Some(0), "{now}");
    }
}
