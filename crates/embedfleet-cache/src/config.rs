//! [`CacheConfig`]: how big the in-process tier is, where Redis is, and how the cache treats it.
//! A plain serde struct; fill what you need and take the rest from `..CacheConfig::default()`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::ElementType;
use crate::CacheError;

/// Configuration of a [`crate::VectorCache`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Upper bound, in bytes, of the in-process LRU. An entry weighs its encoded value plus its
    /// key, so the bound holds for what the cache keeps rather than for an entry count whose
    /// memory would depend on the vector width (a 4096-d partial is 10x a 384-d one). `0`
    /// disables the in-process tier. Default 128 MiB: about 20,000 fused 1536-d f32 vectors.
    pub lru_bytes: usize,
    /// Redis to share results across processes and restarts, e.g. `redis://127.0.0.1:6379`, or
    /// `rediss://` for TLS. A user and password in the URL (`redis://app:secret@host`) are sent
    /// with `AUTH`; logs show the URL with the password masked. `None` runs on the in-process
    /// tier alone (said once in the log at start).
    pub redis_url: Option<String>,
    /// Redis ACL user for `AUTH`, instead of one in the URL.
    pub redis_username: Option<String>,
    /// File that holds the Redis password (a trailing newline is ignored), instead of one in the
    /// URL: a mounted secret keeps the password out of the URL, the process list and the logs.
    pub redis_password_file: Option<PathBuf>,
    /// PEM bundle of the CA that signed the server's certificate, for a `rediss://` URL whose
    /// server the system roots do not vouch for (a private CA).
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for a Redis that requires them (`tls-auth-clients yes`).
    /// Both or neither; `rediss://` only.
    pub redis_tls_cert: Option<PathBuf>,
    /// The key of [`Self::redis_tls_cert`].
    pub redis_tls_key: Option<PathBuf>,
    /// Expiry of values written to Redis, in seconds (`SET ... EX`). Default
    /// [`DEFAULT_TTL_SECS`] (7 days), so entries of retired revisions and fusion layers, which no
    /// key names any more, leave Redis even where no `maxmemory` policy is set. `None` keeps
    /// values until Redis evicts them under its own `maxmemory` policy. The in-process tier has
    /// no expiry: its byte bound already limits staleness to what fits.
    pub ttl_secs: Option<u64>,
    /// Store values as half precision (f16): half the bytes in Redis and in the LRU, at about
    /// 1e-3 absolute error on unit-norm embeddings, which cosine similarity does not notice.
    /// Either format is read back whatever this says, so switching orphans nothing.
    pub f16: bool,
    /// Bound on each Redis call, in milliseconds. A slow or unreachable Redis must cost a
    /// request at most this; past it the call counts as failed and the request goes on without
    /// Redis. Loopback round trips take tens of microseconds, so 50 ms only fires on trouble.
    pub redis_timeout_ms: u64,
    /// After a failed Redis call, how long (milliseconds) the cache skips Redis before one call
    /// probes it again. Keeps an outage from charging every request `redis_timeout_ms`, while
    /// still noticing a recovered Redis within about this long.
    pub redis_retry_ms: u64,
}

/// Default expiry of Redis values: 7 days.
pub const DEFAULT_TTL_SECS: u64 = 7 * 24 * 3600;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            lru_bytes: 128 << 20,
            redis_url: None,
            redis_username: None,
            redis_password_file: None,
            redis_tls_ca: None,
            redis_tls_cert: None,
            redis_tls_key: None,
            ttl_secs: Some(DEFAULT_TTL_SECS),
            f16: false,
            redis_timeout_ms: 50,
            redis_retry_ms: 1_000,
        }
    }
}

impl CacheConfig {
    /// The element type values are written with.
    pub fn element_type(&self) -> ElementType {
        if self.f16 {
            ElementType::F16
        } else {
            ElementType::F32
        }
    }

    /// [`Self::redis_timeout_ms`] as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// [`Self::redis_retry_ms`] as a duration.
    pub fn redis_retry(&self) -> Duration {
        Duration::from_millis(self.redis_retry_ms)
    }

    /// Rejects values that would make the cache misbehave rather than merely be slow.
    pub fn validate(&self) -> Result<(), CacheError> {
        if self.redis_timeout_ms == 0 {
            return Err(CacheError::InvalidConfig(
                "redis_timeout_ms must be at least 1 (0 would fail every Redis call)".into(),
            ));
        }
        if self.ttl_secs == Some(0) {
            return Err(CacheError::InvalidConfig(
                "ttl_secs must be at least 1 (Redis rejects EX 0); null for no expiry".into(),
            ));
        }
        if self.redis_tls_cert.is_some() != self.redis_tls_key.is_some() {
            return Err(CacheError::InvalidConfig(
                "redis_tls_cert and redis_tls_key go together".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields() {
        let config: CacheConfig =
            serde_json::from_str(r#"{"redis_url": "redis://h:1", "f16": true}"#).expect("parse");
        assert_eq!(
            config,
            CacheConfig {
                redis_url: Some("redis://h:1".into()),
                f16: true,
                ..CacheConfig::default()
            }
        );
        assert_eq!(config.element_type(), ElementType::F16);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(serde_json::from_str::<CacheConfig>(r#"{"ttl": 5}"#).is_err());
        let zero_timeout = CacheConfig {
            redis_timeout_ms: 0,
            ..CacheConfig::default()
        };
        assert!(zero_timeout.validate().is_err());
        let zero_ttl = CacheConfig {
            ttl_secs: Some(0),
            ..CacheConfig::default()
        };
        assert!(zero_ttl.validate().is_err());
    }
}
