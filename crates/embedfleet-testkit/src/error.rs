//! The one error type of the testkit. Messages are written for the person reading a failed
//! test: they name the binary, the port and, for a missing binary, how to install it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a server could not be started, stopped or restarted.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// The server binary is neither on `PATH` nor in the usual system directories.
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
    /// Spawning the process failed at the OS level.
    #[error("could not spawn `{binary}`: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The process exited before its port accepted connections.
    #[error(
        "`{binary}` on port {port} exited before accepting connections ({status}); its log:\n{log}"
    )]
    ExitedEarly {
        binary: PathBuf,
        port: u16,
        status: String,
        log: String,
    },
    /// The port did not accept connections within the bounded wait.
    #[error("`{binary}` did not accept connections on 127.0.0.1:{port} within {waited:?}; its log:\n{log}")]
    NotReady {
        binary: PathBuf,
        port: u16,
        waited: Duration,
        log: String,
    },
    /// Every attempt to start on a fresh free port lost the port to another process.
    #[error("`{binary}` could not bind a free port after {attempts} attempts; last log:\n{log}")]
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

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| TestkitError::Io { what, source }
    }
}
