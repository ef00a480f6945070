//! Shared by the cache's integration tests: keys, vectors, a raw Redis connection to look behind
//! the cache's back, and a log capture to count what the cache said.

#![allow(dead_code)] // each test file uses its own subset

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedfleet_cache::CacheKey;
use embedfleet_proto::{ContentKey, Input, InputType};
use redis::aio::MultiplexedConnection;

pub fn key(i: usize) -> CacheKey {
    let content = ContentKey::new(
        &Input::Text(format!("input {i}")),
        None,
        InputType::Document,
        "minilm",
        "rev1",
    );
    CacheKey::partial("minilm", "rev1", &content)
}

/// A deterministic vector that differs per seed.
pub fn vector(seed: usize, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|i| (((seed * 31 + i) as f32) * 0.173).sin() * 0.25)
        .collect()
}

/// A connection that bypasses the cache.
pub async fn raw(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

pub async fn raw_get(conn: &mut MultiplexedConnection, key: &CacheKey) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key.as_str())
        .query_async(conn)
        .await
        .expect("GET")
}

pub async fn raw_set(conn: &mut MultiplexedConnection, key: &CacheKey, value: &[u8]) {
    redis::cmd("SET")
        .arg(key.as_str())
        .arg(value)
        .query_async::<()>(conn)
        .await
        .expect("SET");
}

/// How many times Redis has run `command` (from `INFO commandstats`).
pub async fn command_calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Polls `check` until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Everything logged on this thread while the guard lives, as plain text.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Installs a subscriber for the current thread (use a current-thread runtime).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let buffer = Arc::clone(&self.0);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || CaptureWriter(Arc::clone(&buffer)))
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}
