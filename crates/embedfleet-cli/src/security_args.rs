//! NATS and Redis credentials and TLS flags, shared by every command that connects (`serve`,
//! `coordinator`, `worker`, `embed --nats-url`, `bench`). Each flag has an environment variable;
//! secrets are taken from files (or, for NATS, the `EMBEDFLEET_NATS_PASSWORD` and
//! `EMBEDFLEET_NATS_TOKEN` variables), never from the command line, where other local users
//! could read them in the process list. What the settings mean is `embedfleet_client::security`
//! for NATS and `embedfleet_cache::CacheConfig` for Redis; docs/operations.md#security shows a
//! deployment.

use std::path::PathBuf;

use clap::Args;

use embedfleet_cache::CacheConfig;
use embedfleet_client::security::{
    NatsSecurity, NatsTls, Secret, SecuritySettings, ENV_NATS_PASSWORD, ENV_NATS_TOKEN,
};

/// How this process authenticates to NATS and checks its TLS certificate.
#[derive(Args, Debug, Clone, Default)]
pub struct NatsSecurityArgs {
    /// NATS credentials file (`.creds`: user JWT and nkey seed), for servers in operator mode.
    #[arg(long, env = "EMBEDFLEET_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`), for servers that list the user's public nkey.
    #[arg(long, env = "EMBEDFLEET_NATS_NKEY_SEED_FILE", value_name = "FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// NATS user; its password comes from --nats-password-file or EMBEDFLEET_NATS_PASSWORD.
    #[arg(long, env = "EMBEDFLEET_NATS_USER")]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user.
    #[arg(long, env = "EMBEDFLEET_NATS_PASSWORD_FILE", value_name = "FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS authentication token (or set EMBEDFLEET_NATS_TOKEN).
    #[arg(long, env = "EMBEDFLEET_NATS_TOKEN_FILE", value_name = "FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// PEM CA that signed the NATS server's certificate; setting it requires TLS.
    #[arg(long, env = "EMBEDFLEET_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for NATS servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "EMBEDFLEET_NATS_TLS_CERT", value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM key of --nats-tls-cert.
    #[arg(long, env = "EMBEDFLEET_NATS_TLS_KEY", value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsSecurityArgs {
    /// The settings, with secret files read and the combination checked.
    pub fn security(&self) -> anyhow::Result<NatsSecurity> {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.is_empty())
                .map(Secret::new)
        };
        let settings = SecuritySettings {
            creds_file: self.nats_creds.clone(),
            nkey_seed_file: self.nats_nkey_seed_file.clone(),
            user: self.nats_user.clone(),
            password_file: self.nats_password_file.clone(),
            password: from_env(ENV_NATS_PASSWORD),
            token_file: self.nats_token_file.clone(),
            token: from_env(ENV_NATS_TOKEN),
            tls: NatsTls {
                ca_file: self.nats_tls_ca.clone(),
                cert_file: self.nats_tls_cert.clone(),
                key_file: self.nats_tls_key.clone(),
            },
        };
        Ok(settings.resolve()?)
    }
}

/// How this process authenticates to Redis and checks its TLS certificate. A user and password
/// in the URL work too (`redis://app:secret@host`, best passed as EMBEDFLEET_REDIS_URL).
#[derive(Args, Debug, Clone, Default)]
pub struct RedisSecurityArgs {
    /// Redis ACL user (`AUTH user password`).
    #[arg(long, env = "EMBEDFLEET_REDIS_USER")]
    pub redis_user: Option<String>,
    /// File holding the Redis password.
    #[arg(long, env = "EMBEDFLEET_REDIS_PASSWORD_FILE", value_name = "FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM CA that signed Redis' certificate (a `rediss://` URL).
    #[arg(long, env = "EMBEDFLEET_REDIS_TLS_CA", value_name = "FILE")]
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a Redis with `tls-auth-clients yes` (with --redis-tls-key).
    #[arg(long, env = "EMBEDFLEET_REDIS_TLS_CERT", value_name = "FILE")]
    pub redis_tls_cert: Option<PathBuf>,
    /// PEM key of --redis-tls-cert.
    #[arg(long, env = "EMBEDFLEET_REDIS_TLS_KEY", value_name = "FILE")]
    pub redis_tls_key: Option<PathBuf>,
}

impl RedisSecurityArgs {
    /// `config` with these settings.
    pub fn apply(&self, config: CacheConfig) -> CacheConfig {
        CacheConfig {
            redis_username: self.redis_user.clone(),
            redis_password_file: self.redis_password_file.clone(),
            redis_tls_ca: self.redis_tls_ca.clone(),
            redis_tls_cert: self.redis_tls_cert.clone(),
            redis_tls_key: self.redis_tls_key.clone(),
            ..config
        }
    }
}

/// What to check when the first connection to NATS fails: the credentials and TLS settings when
/// the server refused us, the address when it could not be reached.
pub fn connect_hint(error: &async_nats::ConnectError) -> &'static str {
    use async_nats::ConnectErrorKind;
    // async-nats reports a certificate it does not trust as an I/O error whose text is rustls'
    // ("invalid peer certificate: UnknownIssuer"), not as its TLS kind.
    let text = error.to_string().to_ascii_lowercase();
    let tls_failure = ["certificate", "tls", "handshake"]
        .iter()
        .any(|word| text.contains(word));
    match error.kind() {
        ConnectErrorKind::Io if tls_failure => {
            "the TLS handshake failed; check the URL scheme, --nats-tls-ca and \
             --nats-tls-cert/--nats-tls-key"
        }
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            "the server refused the credentials; check --nats-creds, --nats-nkey-seed-file, \
             --nats-user/--nats-password-file or --nats-token-file"
        }
        ConnectErrorKind::Tls => {
            "the TLS handshake failed; check the URL scheme, --nats-tls-ca and \
             --nats-tls-cert/--nats-tls-key"
        }
        _ => UNREACHABLE_HINT,
    }
}

/// [`connect_hint`] for a server that could not be reached at all.
pub const UNREACHABLE_HINT: &str = "is the server up and the address right?";
