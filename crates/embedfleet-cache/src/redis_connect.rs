//! How the Redis tier reaches a Redis that wants proof: `AUTH` with a user and a password (from
//! the URL or from a secret file), and TLS (`rediss://`) with a private CA and, where the server
//! asks for them, a client certificate.
//!
//! Everything is read once, when the tier is built, so a missing or unreadable file is a start-up
//! error that names the file; the password itself never reaches a log line or a `Debug` output
//! (redis-rs keeps it in its connection info, which we do not print).

use std::path::Path;

use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};

use crate::{CacheConfig, CacheError};

/// A redis-rs client for `url` with the AUTH and TLS settings of `config`. `url_for_logs` is
/// the URL with its password masked, for error messages.
pub(crate) fn client(
    url: &str,
    url_for_logs: &str,
    config: &CacheConfig,
) -> Result<redis::Client, CacheError> {
    let invalid_url = |source| CacheError::InvalidRedisUrl {
        url: url_for_logs.to_owned(),
        source,
    };
    let mut info = url.into_connection_info().map_err(invalid_url)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.redis_username {
        settings = settings.set_username(user);
    }
    if let Some(path) = &config.redis_password_file {
        settings = settings.set_password(read_secret(path, "redis_password_file")?);
    }
    info = info.set_redis_settings(settings);

    let wants_tls_files = config.redis_tls_ca.is_some() || config.redis_tls_cert.is_some();
    if !wants_tls_files {
        return redis::Client::open(info).map_err(invalid_url);
    }
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        return Err(CacheError::InvalidConfig(format!(
            "redis_tls_ca / redis_tls_cert need a rediss:// URL, not {url_for_logs}"
        )));
    }
    let root_cert = match &config.redis_tls_ca {
        Some(path) => Some(read_file(path, "redis_tls_ca")?),
        None => None,
    };
    let client_tls = match (&config.redis_tls_cert, &config.redis_tls_key) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read_file(cert, "redis_tls_cert")?,
            client_key: read_file(key, "redis_tls_key")?,
        }),
        _ => None,
    };
    redis::Client::build_with_tls(
        info,
        TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(invalid_url)
}

/// Whether an error from the first call says the settings are wrong (Redis refused the
/// credentials, or the TLS handshake failed), as opposed to Redis being away: the former is a
/// start-up error, the latter an outage the cache rides out.
pub(crate) fn is_refusal(error: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) {
        return true;
    }
    if matches!(error.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM")) {
        return true;
    }
    // rustls reports a certificate it does not trust (or a peer that does not speak TLS) as
    // invalid data on the stream; a Redis that is down is refused, reset or timed out instead.
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

fn read_file(path: &Path, setting: &str) -> Result<Vec<u8>, CacheError> {
    std::fs::read(path).map_err(|error| {
        CacheError::InvalidConfig(format!(
            "{setting}: cannot read {}: {error}",
            path.display()
        ))
    })
}

/// The file's text without its trailing newline (what `echo secret > file` and Kubernetes
/// secrets written by hand leave).
fn read_secret(path: &Path, setting: &str) -> Result<String, CacheError> {
    let bytes = read_file(path, setting)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        CacheError::InvalidConfig(format!("{setting}: {} is not UTF-8", path.display()))
    })?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(CacheError::InvalidConfig(format!(
            "{setting}: {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_owned())
}
