//! Finding a server binary. Debian installs `nats-server` in `/usr/sbin`, which is not on a
//! non-root user's `PATH`, so the usual system directories are searched after `PATH`; an
//! environment variable overrides both for a binary kept elsewhere.

use std::env;
use std::path::{Path, PathBuf};

use crate::TestkitError;

/// A server binary the testkit can start, and how to tell the user to get it.
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
    /// The binary's path: the environment override, then `PATH`, then `/usr/sbin`,
    /// `/usr/bin` and `/usr/local/bin`.
    pub fn locate(&self) -> Result<PathBuf, TestkitError> {
        if let Some(path) = env::var_os(self.env_var).map(PathBuf::from) {
            if is_executable_file(&path) {
                return Ok(path);
            }
        }
        let path_dirs = env::var_os("PATH")
            .map(|p| env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        path_dirs
            .into_iter()
            .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable_file(candidate))
            .ok_or(TestkitError::BinaryNotFound {
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
    }
}
