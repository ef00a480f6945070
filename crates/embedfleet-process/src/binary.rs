//! Finding a server binary. Debian installs `nats-server` in `/usr/sbin`, which is not on a
//! non-root user's `PATH`, so the usual system directories are searched after `PATH`; an
//! environment variable overrides both for a binary kept elsewhere.

use std::env;
use std::path::{Path, PathBuf};

use crate::ProcessError;

/// A server binary that can be started, and how to tell the user to get it.
#[derive(Debug, Clone, Copy)]
pub struct ServerBinary {
    /// File name looked up on `PATH`, e.g. `redis-server`.
    pub name: &'static str,
    /// Debian package that provides it, named in the error when it is missing.
    pub package: &'static str,
    /// Environment variable that, when set, is used as the binary's path.
    pub env_var: &'static str,
}

/// Searched after `PATH`, in this order.
const SYSTEM_DIRS: [&str; 3] = ["/usr/sbin", "/usr/bin", "/usr/local/bin"];

impl ServerBinary {
    /// The binary's path: the environment override when it is set (and not empty), else the
    /// first of `PATH`, `/usr/sbin`, `/usr/bin` and `/usr/local/bin` that holds it. An override
    /// that is not an executable file is [`ProcessError::BadOverride`].
    pub fn locate(&self) -> Result<PathBuf, ProcessError> {
        if let Some(path) = env::var_os(self.env_var).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            return if is_executable_file(&path) {
                Ok(path)
            } else {
                Err(ProcessError::BadOverride {
                    env_var: self.env_var,
                    path,
                })
            };
        }
        let path_dirs = env::var_os("PATH")
            .map(|p| env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        path_dirs
            .into_iter()
            .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable_file(candidate))
            .ok_or(ProcessError::BinaryNotFound {
                binary: self.name,
                package: self.package,
                env_var: self.env_var,
            })
    }
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_the_package_to_install() {
        let missing = ServerBinary {
            name: "embedfleet-no-such-server",
            package: "no-such-package",
            env_var: "EMBEDFLEET_TESTKIT_NO_SUCH_SERVER",
        };
        let message = missing.locate().unwrap_err().to_string();
        assert!(message.contains("embedfleet-no-such-server"), "{message}");
        assert!(
            message.contains("apt-get install no-such-package"),
            "{message}"
        );
        assert!(!message.contains('\n'));
    }

    #[test]
    fn a_wrong_override_is_an_error_not_a_fallback() {
        // `sh` is on every PATH: a fallback would find it.
        const VAR: &str = "EMBEDFLEET_PROCESS_TEST_SH";
        let sh = ServerBinary {
            name: "sh",
            package: "dash",
            env_var: VAR,
        };
        std::env::set_var(VAR, "/nowhere/sh");
        let error = sh.locate().unwrap_err();
        std::env::remove_var(VAR);
        assert!(matches!(error, ProcessError::BadOverride { .. }), "{error}");
        assert!(error.to_string().contains("/nowhere/sh"), "{error}");
        assert!(sh.locate().is_ok(), "without the override PATH has sh");
    }
}
