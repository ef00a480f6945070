//! The one error type of server processes. Messages are one line (they reach a CLI user as
//! `error: ...` as well as a test log): they name the binary, the port and, for a missing
//! binary, how to install it; a server's log is quoted by its last lines, joined with ` | `.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a server could not be started, stopped or restarted.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The server binary is neither at the override, on `PATH` nor in the system directories.
    #[error(
        "`{binary}` not found (looked in ${env_var}, PATH, /usr/sbin, /usr/bin, \
         /usr/local/bin); install it with `apt-get install {package}` \
         or point ${env_var} at the binary"
    )]
    BinaryNotFound {
        binary: &'static str,
        package: &'static str,
        env_var: &'static str,
    },
    /// The environment override names something that is not an executable file: an explicit
    /// setting that is wrong is an error, not a reason to quietly run another binary.
    #[error("${env_var} is {}, which is not an executable file", .path.display())]
    BadOverride {
        env_var: &'static str,
        path: PathBuf,
    },
    /// Spawning the process failed at the OS level.
    #[error("could not spawn `{}`: {source}", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The process exited before it listened on its port.
    #[error("`{}` on port {port} exited before accepting connections ({status}); its log: {log}", .binary.display())]
    ExitedEarly {
        binary: PathBuf,
        port: u16,
        status: String,
        log: String,
    },
    /// The process did not listen on its port within the bounded wait; it has been killed.
    #[error("`{}` did not accept connections on 127.0.0.1:{port} within {waited:?}; its log: {log}", .binary.display())]
    NotReady {
        binary: PathBuf,
        port: u16,
        waited: Duration,
        log: String,
    },
    /// Every attempt to start on a fresh free port lost the port to another process.
    #[error("`{}` could not bind a free port after {attempts} attempts; last log: {log}", .binary.display())]
    PortsExhausted {
        binary: PathBuf,
        attempts: usize,
        log: String,
    },
    /// Other I/O: the temporary directory, the log file, binding the probe listener, killing.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl ProcessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| ProcessError::Io { what, source }
    }
}
