//! The Redis tier: batched reads (one `MGET`) and writes (one pipeline of `SET`s) over redis-rs's
//! reconnecting [`ConnectionManager`], each call bounded by a short timeout, with outage tracking
//! so that a Redis that is down costs requests nothing and the logs one line.
//!
//! # Outage behaviour
//!
//! Every call is bounded by `redis_timeout_ms`. A call that fails or times out:
//!
//! - counts in `redis_errors`, and the request goes on as if Redis had no entries;
//! - if Redis was up, starts an outage: one `warn` line, `redis_outages` + 1;
//! - opens a back-off window of `redis_retry_ms` in which calls skip Redis outright (counted in
//!   `redis_skipped`), so an outage does not charge every request the timeout.
//!
//! When the window has passed, the first call to arrive probes Redis (the others keep
//! skipping). Meanwhile the connection manager reconnects in the background; once a call
//! succeeds the outage ends with one `info` line that says how many calls failed. No restart is
//! needed, and nothing is retried: a cache can afford to miss.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;

use crate::stats::Counter;
use crate::{CacheConfig, CacheError, CacheKey};

/// Bound on establishing a connection. Generous next to the call timeout because connecting
/// happens once, in the background of the connection manager, not on a request's path.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The Redis half of the cache.
#[derive(Debug)]
pub struct RedisTier {
    /// Cheap to clone (an `Arc`); each call clones it because commands take `&mut`.
    manager: ConnectionManager,
    /// The URL with any password masked, for log lines.
    url_for_logs: String,
    call_timeout: Duration,
    ttl_secs: Option<u64>,
    health: Health,
}

impl RedisTier {
    /// A tier for `url` that connects lazily: construction never waits for Redis, and an
    /// unreachable Redis is an outage, not an error. Must run inside a Tokio runtime.
    pub fn new(url: &str, config: &CacheConfig) -> Result<Self, CacheError> {
        let url_for_logs = mask_password(url);
        let client = crate::redis_connect::client(url, &url_for_logs, config)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(CacheError::NoTokioRuntime);
        }
        let manager_config = ConnectionManagerConfig::new()
            // One attempt per reconnect: the back-off window of `Health` decides when to try
            // again, so the manager must not sit in a retry loop that calls would wait on.
            .set_number_of_retries(0)
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(config.redis_timeout()));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(RedisTier {
            manager,
            url_for_logs,
            call_timeout: config.redis_timeout(),
            ttl_secs: config.ttl_secs,
            health: Health::new(config.redis_retry()),
        })
    }

    /// The URL with any password masked.
    pub fn url_for_logs(&self) -> &str {
        &self.url_for_logs
    }

    /// Checks that Redis answers, allowing `wait` (a connection may need establishing first).
    /// Used once at start. A Redis that is away starts an outage like any other and is `Ok`; a
    /// Redis that answers but refuses us (wrong or missing password, no ACL permission, a TLS
    /// certificate we do not trust) is [`CacheError::RedisRefused`]: waiting will not fix it.
    pub async fn ping(&self, wait: Duration) -> Result<(), CacheError> {
        let mut conn = self.manager.clone();
        let ping = async move { redis::cmd("PING").query_async::<String>(&mut conn).await };
        match tokio::time::timeout(wait, ping).await {
            Ok(Err(error)) if crate::redis_connect::is_refusal(&error) => {
                Err(CacheError::RedisRefused {
                    url: self.url_for_logs.clone(),
                    source: error,
                })
            }
            Ok(Ok(_)) => {
                self.health.succeeded(&self.url_for_logs);
                Ok(())
            }
            Ok(Err(error)) => {
                self.health
                    .failed(&self.url_for_logs, &CacheError::Redis(error));
                Ok(())
            }
            Err(_elapsed) => {
                let error = CacheError::RedisTimeout(wait);
                self.health.failed(&self.url_for_logs, &error);
                Ok(())
            }
        }
    }

    /// The stored values of `keys`, `None` for each absent key; `None` overall when Redis could
    /// not be asked (outage, timeout), which the caller treats as all misses.
    pub async fn get_many(&self, keys: &[&CacheKey]) -> Option<Vec<Option<Vec<u8>>>> {
        let mut mget = redis::cmd("MGET");
        keys.iter().for_each(|key| {
            mget.arg(key.as_str());
        });
        let mut conn = self.manager.clone();
        let query = async move { mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await };
        self.call(query).await
    }

    /// Writes every entry in one pipeline (`SET key value [EX ttl]`). Failures are counted and
    /// logged as an outage, never returned: a write the cache could not make is only a future
    /// miss.
    pub async fn put_many(&self, entries: &[(&CacheKey, &[u8])]) {
        if entries.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            pipe.cmd("SET").arg(key.as_str()).arg(*value);
            if let Some(ttl) = self.ttl_secs {
                pipe.arg("EX").arg(ttl);
            }
            pipe.ignore();
        }
        let mut conn = self.manager.clone();
        let query = async move { pipe.query_async::<()>(&mut conn).await };
        self.call(query).await;
    }

    /// Failed calls since creation.
    pub fn errors(&self) -> u64 {
        self.health.errors.get()
    }

    /// Calls skipped in back-off windows since creation.
    pub fn skipped(&self) -> u64 {
        self.health.skipped.get()
    }

    /// Outages (up → down transitions) since creation.
    pub fn outages(&self) -> u64 {
        self.health.outages.get()
    }

    /// Whether the last call failed and no call has succeeded since.
    pub fn is_down(&self) -> bool {
        self.health.down.load(Ordering::Relaxed)
    }

    async fn call<T>(&self, query: impl Future<Output = RedisResult<T>>) -> Option<T> {
        self.call_within(self.call_timeout, query).await
    }

    /// Runs `query` unless an outage's back-off window says to skip it, bounded by `limit`, and
    /// records the outcome.
    async fn call_within<T>(
        &self,
        limit: Duration,
        query: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        if !self.health.admit() {
            return None;
        }
        let outcome = match tokio::time::timeout(limit, query).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(CacheError::Redis(error)),
            Err(_elapsed) => Err(CacheError::RedisTimeout(limit)),
        };
        match outcome {
            Ok(value) => {
                self.health.succeeded(&self.url_for_logs);
                Some(value)
            }
            Err(error) => {
                self.health.failed(&self.url_for_logs, &error);
                None
            }
        }
    }
}

/// Outage state shared by all calls of one tier.
#[derive(Debug)]
struct Health {
    /// Time base for `skip_until_nanos` (atomics cannot hold an `Instant`).
    epoch: Instant,
    retry_after: Duration,
    down: AtomicBool,
    /// While down: calls before this instant (nanoseconds after `epoch`) skip Redis.
    skip_until_nanos: AtomicU64,
    /// Failed calls in the current outage, for the line that ends it.
    failed_in_outage: AtomicU64,
    errors: Counter,
    skipped: Counter,
    outages: Counter,
}

impl Health {
    fn new(retry_after: Duration) -> Self {
        Health {
            epoch: Instant::now(),
            retry_after,
            down: AtomicBool::new(false),
            skip_until_nanos: AtomicU64::new(0),
            failed_in_outage: AtomicU64::new(0),
            errors: Counter::default(),
            skipped: Counter::default(),
            outages: Counter::default(),
        }
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn retry_deadline(&self) -> u64 {
        let retry = u64::try_from(self.retry_after.as_nanos()).unwrap_or(u64::MAX);
        self.now_nanos().saturating_add(retry)
    }

    /// Whether this call may use Redis: always while up; while down, only the one call that
    /// claims the next probe once the back-off window has passed.
    fn admit(&self) -> bool {
        if !self.down.load(Ordering::Relaxed) {
            return true;
        }
        let skip_until = self.skip_until_nanos.load(Ordering::Relaxed);
        let admitted = self.now_nanos() >= skip_until
            && self
                .skip_until_nanos
                .compare_exchange(
                    skip_until,
                    self.retry_deadline(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if !admitted {
            self.skipped.incr();
        }
        admitted
    }

    fn failed(&self, url: &str, error: &CacheError) {
        self.errors.incr();
        self.skip_until_nanos
            .store(self.retry_deadline(), Ordering::Relaxed);
        if self.down.swap(true, Ordering::Relaxed) {
            self.failed_in_outage.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(redis = url, %error, "redis call failed during an outage");
        } else {
            self.failed_in_outage.store(1, Ordering::Relaxed);
            self.outages.incr();
            tracing::warn!(
                redis = url,
                %error,
                retry_ms = self.retry_after.as_millis() as u64,
                "redis unreachable: serving from the in-process cache only until it answers \
                 again (logged once per outage; failed calls are counted in redis_errors)"
            );
        }
    }

    fn succeeded(&self, url: &str) {
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            let failed_calls = self.failed_in_outage.load(Ordering::Relaxed);
            tracing::info!(
                redis = url,
                failed_calls,
                "redis answers again: the cache uses it again"
            );
        }
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`, so URLs can be logged.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    format!("{scheme}://{user}:***@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_in_logged_urls() {
        assert_eq!(
            mask_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            mask_password("redis://:s3cret@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            mask_password("rediss://app:p@ss@cache:6380"),
            "rediss://app:***@cache:6380"
        );
    }

    #[test]
    fn an_outage_admits_one_probe_per_window() {
        let health = Health::new(Duration::from_secs(3600));
        assert!(health.admit());
        health.failed(
            "redis://x",
            &CacheError::RedisTimeout(Duration::from_millis(1)),
        );
        assert!(!health.admit(), "inside the back-off window");
        assert_eq!(
            (
                health.errors.get(),
                health.skipped.get(),
                health.outages.get()
            ),
            (1, 1, 1)
        );
        health.skip_until_nanos.store(0, Ordering::Relaxed); // the window has passed
        assert!(health.admit(), "the first call after the window probes");
        assert!(!health.admit(), "only one call probes");
        health.succeeded("redis://x");
        assert!(health.admit());
        assert!(!health.down.load(Ordering::Relaxed));
    }
}
