//! [`NatsSecurity`]: how a connection proves who it is to NATS and checks who the server is.
//! Every embedfleet process that connects to NATS (the client, `embed --nats-url`, `bench`, and
//! the coordinator, worker and `serve` roles) builds its [`async_nats::ConnectOptions`] here, so
//! the one set of settings means the same everywhere.
//!
//! - **Who we are**, one of: a credentials file (user JWT + nkey seed, for servers in operator
//!   mode), an nkey seed, a user and password, or a token.
//! - **Who the server is**: TLS with the system roots, or a private CA ([`NatsTls::ca_file`]);
//!   a client certificate for servers that verify clients (`verify: true`).
//!
//! Secrets (password, token, nkey seed) come from files (a mounted secret) or environment
//! variables, never from the command line, where any local user could read them in the process
//! list. They are held as [`Secret`], whose `Debug` prints `***`, and no error message quotes
//! them.

use std::fmt;
use std::path::{Path, PathBuf};

use async_nats::ConnectOptions;

/// Path of a credentials file (`.creds`: user JWT and nkey seed).
pub const ENV_NATS_CREDS: &str = "EMBEDFLEET_NATS_CREDS";
/// Path of a file that holds an nkey seed (`SU...`).
pub const ENV_NATS_NKEY_SEED_FILE: &str = "EMBEDFLEET_NATS_NKEY_SEED_FILE";
/// User name for user/password authentication.
pub const ENV_NATS_USER: &str = "EMBEDFLEET_NATS_USER";
/// Path of a file that holds the password of [`ENV_NATS_USER`].
pub const ENV_NATS_PASSWORD_FILE: &str = "EMBEDFLEET_NATS_PASSWORD_FILE";
/// The password itself, for platforms that hand secrets over as environment variables.
pub const ENV_NATS_PASSWORD: &str = "EMBEDFLEET_NATS_PASSWORD";
/// Path of a file that holds an authentication token.
pub const ENV_NATS_TOKEN_FILE: &str = "EMBEDFLEET_NATS_TOKEN_FILE";
/// The token itself.
pub const ENV_NATS_TOKEN: &str = "EMBEDFLEET_NATS_TOKEN";
/// PEM bundle of the CA that signed the server's certificate.
pub const ENV_NATS_TLS_CA: &str = "EMBEDFLEET_NATS_TLS_CA";
/// PEM client certificate, for servers that verify clients.
pub const ENV_NATS_TLS_CERT: &str = "EMBEDFLEET_NATS_TLS_CERT";
/// PEM key of [`ENV_NATS_TLS_CERT`].
pub const ENV_NATS_TLS_KEY: &str = "EMBEDFLEET_NATS_TLS_KEY";

/// A password, token or seed: shown as `***` by `Debug`, so logging a config never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The file's text without its trailing newline; `what` names the setting in errors.
    pub fn from_file(path: &Path, what: &'static str) -> Result<Self, SecurityError> {
        let unreadable = |reason: String| SecurityError::Unreadable {
            what,
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(unreadable("the file is empty".into()));
        }
        Ok(Secret(value.to_owned()))
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Who the client is to the server. One mode per connection: NATS takes one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a server without authorization, or user and password in the URL).
    #[default]
    None,
    /// A `.creds` file: the user JWT and the nkey seed that signs the server's nonce.
    CredsFile(PathBuf),
    /// An nkey seed; the server lists the user's public key.
    Nkey(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

/// How the client checks the server, and proves itself with a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM CA bundle that signed the server's certificate; setting it requires TLS. Without it a
    /// `tls://` URL (or a server that requires TLS) is checked against the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers with `verify: true`; needs [`Self::key_file`].
    pub cert_file: Option<PathBuf>,
    /// PEM key of [`Self::cert_file`].
    pub key_file: Option<PathBuf>,
}

/// Authentication and TLS settings of one NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSecurity {
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

/// A security setting that cannot be used. Messages name the setting and the file, never a
/// secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    #[error("{what}: cannot read {}: {reason}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// Two authentication modes at once, a password without a user, a certificate without a key.
    #[error("NATS security settings: {0}")]
    Conflict(String),
}

impl NatsSecurity {
    /// The settings the `EMBEDFLEET_NATS_*` environment variables give (the `ENV_*` constants);
    /// nothing set is [`NatsSecurity::default`]: no credentials, TLS only if the URL asks.
    pub fn from_env() -> Result<Self, SecurityError> {
        let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        let path = |name: &str| var(name).map(PathBuf::from);
        let secret = |name: &str| {
            var(name)
                .and_then(|value| value.into_string().ok())
                .map(Secret::new)
        };
        let settings = SecuritySettings {
            creds_file: path(ENV_NATS_CREDS),
            nkey_seed_file: path(ENV_NATS_NKEY_SEED_FILE),
            user: var(ENV_NATS_USER).and_then(|v| v.into_string().ok()),
            password_file: path(ENV_NATS_PASSWORD_FILE),
            password: secret(ENV_NATS_PASSWORD),
            token_file: path(ENV_NATS_TOKEN_FILE),
            token: secret(ENV_NATS_TOKEN),
            tls: NatsTls {
                ca_file: path(ENV_NATS_TLS_CA),
                cert_file: path(ENV_NATS_TLS_CERT),
                key_file: path(ENV_NATS_TLS_KEY),
            },
        };
        settings.resolve()
    }

    /// `options` with these credentials and TLS settings. Files are checked here, so a wrong
    /// path fails with its name before any connection attempt.
    pub async fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, SecurityError> {
        let mut options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::CredsFile(path) => {
                options
                    .credentials_file(path)
                    .await
                    .map_err(|e| SecurityError::Unreadable {
                        what: "NATS credentials file",
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
            }
            NatsAuth::Nkey(seed) => {
                // Checked here: async-nats would only fail later, when signing the nonce.
                nkeys::KeyPair::from_seed(seed.expose()).map_err(|_| {
                    SecurityError::Conflict("the NATS nkey seed is not a valid seed".into())
                })?;
                options.nkey(seed.expose().to_owned())
            }
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            NatsAuth::Token(token) => options.token(token.expose().to_owned()),
        };
        if let Some(ca) = &self.tls.ca_file {
            readable(ca, "NATS TLS CA")?;
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls.cert_file, &self.tls.key_file) {
            readable(cert, "NATS TLS client certificate")?;
            readable(key, "NATS TLS client key")?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }

    /// A short, secret-free description for start-up lines: `auth=user tls=ca+client-cert`.
    pub fn describe(&self) -> String {
        let auth = match &self.auth {
            NatsAuth::None => "none",
            NatsAuth::CredsFile(_) => "creds",
            NatsAuth::Nkey(_) => "nkey",
            NatsAuth::UserPassword { .. } => "user",
            NatsAuth::Token(_) => "token",
        };
        let tls = match (&self.tls.ca_file, &self.tls.cert_file) {
            (None, None) => "url",
            (Some(_), None) => "ca",
            (None, Some(_)) => "client-cert",
            (Some(_), Some(_)) => "ca+client-cert",
        };
        format!("auth={auth} tls={tls}")
    }
}

/// The raw settings as flags and environment variables give them, before the checks that make
/// them a [`NatsSecurity`]. Command-line front ends fill this from their own flags.
#[derive(Debug, Clone, Default)]
pub struct SecuritySettings {
    pub creds_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub tls: NatsTls,
}

impl SecuritySettings {
    /// Reads the secret files and checks that the settings name one authentication mode, a
    /// password with its user and a certificate with its key. A file path wins over a secret
    /// given as a value (an environment variable).
    pub fn resolve(self) -> Result<NatsSecurity, SecurityError> {
        let password = match (&self.password_file, self.password) {
            (Some(path), _) => Some(Secret::from_file(path, "NATS password file")?),
            (None, value) => value,
        };
        let token = match (&self.token_file, self.token) {
            (Some(path), _) => Some(Secret::from_file(path, "NATS token file")?),
            (None, value) => value,
        };
        let mut modes = Vec::new();
        if let Some(path) = self.creds_file {
            modes.push(NatsAuth::CredsFile(path));
        }
        if let Some(path) = &self.nkey_seed_file {
            modes.push(NatsAuth::Nkey(Secret::from_file(
                path,
                "NATS nkey seed file",
            )?));
        }
        match (self.user, password) {
            (Some(user), Some(password)) => modes.push(NatsAuth::UserPassword { user, password }),
            (Some(_), None) => {
                return Err(SecurityError::Conflict(
                    "a NATS user needs a password (file or environment)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(SecurityError::Conflict(
                    "a NATS password needs a user".into(),
                ))
            }
            (None, None) => {}
        }
        if let Some(token) = token {
            modes.push(NatsAuth::Token(token));
        }
        if modes.len() > 1 {
            return Err(SecurityError::Conflict(
                "give one of: a credentials file, an nkey seed, a user and password, a token"
                    .into(),
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(SecurityError::Conflict(
                "a NATS TLS client certificate and its key go together".into(),
            ));
        }
        Ok(NatsSecurity {
            auth: modes.pop().unwrap_or_default(),
            tls: self.tls,
        })
    }
}

fn readable(path: &Path, what: &'static str) -> Result<(), SecurityError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| SecurityError::Unreadable {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let security = SecuritySettings {
            user: Some("app".into()),
            password_file: Some(secret_file(dir.path(), "pw", "hunter2\n")),
            ..SecuritySettings::default()
        }
        .resolve()
        .expect("resolve");
        assert_eq!(
            security.auth,
            NatsAuth::UserPassword {
                user: "app".into(),
                password: Secret::new("hunter2")
            },
            "the trailing newline is not part of the password"
        );
        let debug = format!("{security:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );
        assert_eq!(security.describe(), "auth=user tls=url");
    }

    #[test]
    fn one_mode_at_a_time_and_pairs_stay_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let two_modes = SecuritySettings {
            creds_file: Some(dir.path().join("x.creds")),
            token: Some(Secret::new("t")),
            ..SecuritySettings::default()
        };
        assert!(matches!(
            two_modes.resolve(),
            Err(SecurityError::Conflict(_))
        ));
        let lone_user = SecuritySettings {
            user: Some("app".into()),
            ..SecuritySettings::default()
        };
        assert!(matches!(
            lone_user.resolve(),
            Err(SecurityError::Conflict(_))
        ));
        let cert_without_key = SecuritySettings {
            tls: NatsTls {
                cert_file: Some(dir.path().join("c.pem")),
                ..NatsTls::default()
            },
            ..SecuritySettings::default()
        };
        assert!(matches!(
            cert_without_key.resolve(),
            Err(SecurityError::Conflict(_))
        ));
    }

    #[test]
    fn a_missing_or_empty_secret_file_names_the_file_not_the_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = SecuritySettings {
            token_file: Some(dir.path().join("absent")),
            ..SecuritySettings::default()
        };
        let message = missing.resolve().expect_err("missing").to_string();
        assert!(
            message.contains("NATS token file") && message.contains("absent"),
            "{message}"
        );
        let empty = SecuritySettings {
            token_file: Some(secret_file(dir.path(), "empty", "\n")),
            ..SecuritySettings::default()
        };
        let message = empty.resolve().expect_err("empty").to_string();
        assert!(message.contains("empty"), "{message}");
    }

    #[tokio::test]
    async fn a_bad_nkey_seed_fails_before_connecting() {
        let security = NatsSecurity {
            auth: NatsAuth::Nkey(Secret::new("SUNOTASEED")),
            ..NatsSecurity::default()
        };
        let error = security
            .apply(ConnectOptions::new())
            .await
            .expect_err("bad seed");
        assert!(!error.to_string().contains("SUNOTASEED"), "{error}");
    }
}
