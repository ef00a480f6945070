//! One server child process on a fixed loopback port with its own temporary directory: what the
//! testkit's `NatsServer` and `RedisServer` and `embedfleet serve`'s own nats-server share.
//!
//! The port and the directory outlive the process, so [`ServerProcess::restart`] brings the
//! server back where clients expect it (same port, same on-disk state), which is what the
//! reconnect tests need. The child's stdout and stderr go to `server.log` in the directory, so
//! output stays quiet while a failed start can still show why.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary::ServerBinary;
use crate::port::{accepts_connections, free_port, process_listens_on, wait_until};
use crate::ProcessError;

/// Bound on the wait for a started server to accept connections. Generous because the machine
/// may be busy with builds and benchmarks; a healthy server is ready in milliseconds.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on the wait for a killed server's port to refuse connections.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Fresh ports tried by [`ServerProcess::start`] when another process wins the free-port race.
const START_ATTEMPTS: usize = 5;
/// How much of the log's end is read for an error message, and how many of its last lines are
/// quoted.
const LOG_TAIL_BYTES: u64 = 4096;
const LOG_TAIL_LINES: usize = 6;
/// Name of the log file in the server's directory.
const LOG_FILE: &str = "server.log";

/// Builds a server's command-line arguments from its port and its directory.
pub type ArgsFn = fn(port: u16, dir: &Path) -> Vec<OsString>;

/// How the child is spawned, beyond its arguments.
#[derive(Debug, Clone, Copy)]
pub struct SpawnOptions {
    /// Prefix of the temporary directory's name (it shows in `ps` and `/tmp`).
    pub dir_prefix: &'static str,
    /// Put the child in a process group of its own. A terminal's Ctrl-C signals the whole
    /// foreground group; a server that must outlive its parent's drain (`embedfleet serve`
    /// stops its nats-server last) needs to be out of it.
    pub own_process_group: bool,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        SpawnOptions {
            dir_prefix: "embedfleet-server-",
            own_process_group: false,
        }
    }
}

/// A running (or stopped, ready to restart) server child process. Killed on drop.
#[derive(Debug)]
pub struct ServerProcess {
    binary: PathBuf,
    args: ArgsFn,
    options: SpawnOptions,
    port: u16,
    /// Holds the server's state and log; removed on drop, after the child is killed.
    dir: TempDir,
    /// `None` while stopped.
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `binary` on a free port and waits (bounded) until the port accepts connections.
    /// When the server fails to bind because another process took the port first, it tries
    /// again on a new port, up to five times.
    pub fn start(binary: &ServerBinary, args: ArgsFn) -> Result<Self, ProcessError> {
        Self::start_prepared(binary, args, |_| Ok(()))
    }

    /// [`Self::start`], with `prepare` filling the server's fresh directory before the first
    /// spawn (e.g. a config file that `args` names). The directory outlives restarts, so
    /// `prepare` runs once per directory.
    pub fn start_prepared(
        binary: &ServerBinary,
        args: ArgsFn,
        prepare: impl Fn(&Path) -> std::io::Result<()>,
    ) -> Result<Self, ProcessError> {
        Self::start_with(binary, args, prepare, SpawnOptions::default())
    }

    /// [`Self::start_prepared`] with [`SpawnOptions`].
    pub fn start_with(
        binary: &ServerBinary,
        args: ArgsFn,
        prepare: impl Fn(&Path) -> std::io::Result<()>,
        options: SpawnOptions,
    ) -> Result<Self, ProcessError> {
        let binary = binary.locate()?;
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix(options.dir_prefix)
                .tempdir()
                .map_err(ProcessError::io(
                    "creating the server's temporary directory",
                ))?;
            prepare(dir.path()).map_err(ProcessError::io(format!(
                "preparing {} for `{}`",
                dir.path().display(),
                binary.display()
            )))?;
            let mut server = ServerProcess {
                binary: binary.clone(),
                args,
                options,
                port: free_port()?,
                dir,
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(ProcessError::ExitedEarly { log, .. }) if lost_port_race(&log) => {
                    last_log = log;
                }
                Err(other) => return Err(other),
            }
        }
        Err(ProcessError::PortsExhausted {
            binary,
            attempts: START_ATTEMPTS,
            log: last_log,
        })
    }

    /// The loopback port the server listens on, stable across [`Self::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary directory (state and `server.log`), stable across restarts.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the child is running (it has not been stopped and has not exited by itself).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The child's process id while it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL (an outage, not a shutdown), reaps it, and waits until the
    /// port refuses connections. Stopping a stopped server does nothing.
    pub fn stop(&mut self) -> Result<(), ProcessError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // `kill` fails only when the child already exited; `wait` then reaps it either way.
        let _ = child.kill();
        child.wait().map_err(ProcessError::io(format!(
            "reaping the server on port {}",
            self.port
        )))?;
        let port = self.port;
        if !wait_until(STOP_TIMEOUT, || !accepts_connections(port), || false) {
            return Err(ProcessError::Io {
                what: format!("port {port} still accepts connections after the server was killed"),
                source: std::io::ErrorKind::AddrInUse.into(),
            });
        }
        Ok(())
    }

    /// Stops the server if it runs, then starts it again on the same port with the same
    /// directory, and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), ProcessError> {
        self.stop()?;
        self.spawn_and_wait()
    }

    /// The server's log file (its stdout and stderr), in its directory.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// The last lines of the server's log, on one line, for error messages.
    pub fn log_tail(&self) -> String {
        read_tail(&self.dir.path().join(LOG_FILE))
    }

    fn spawn_and_wait(&mut self) -> Result<(), ProcessError> {
        let log_path = self.dir.path().join(LOG_FILE);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(ProcessError::io(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(ProcessError::io("duplicating the log file handle"))?;
        let mut command = Command::new(&self.binary);
        if self.options.own_process_group {
            command.process_group(0);
        }
        let mut child = command
            .args((self.args)(self.port, self.dir.path()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;

        let port = self.port;
        let pid = child.id();
        // Ready when the child itself listens on the port: a plain connect probe could reach
        // another process that took the port first (see `process_listens_on`).
        let ready = wait_until(
            READY_TIMEOUT,
            || process_listens_on(pid, port).unwrap_or_else(|| accepts_connections(port)),
            || !matches!(child.try_wait(), Ok(None)),
        );
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ProcessError::ExitedEarly {
                binary: self.binary.clone(),
                port,
                status: status.to_string(),
                log: read_tail(&log_path),
            });
        }
        self.child = Some(child);
        if !ready {
            let _ = self.stop();
            return Err(ProcessError::NotReady {
                binary: self.binary.clone(),
                port,
                waited: READY_TIMEOUT,
                log: read_tail(&log_path),
            });
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a server's log says it could not bind its port (another process took it).
fn lost_port_race(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// The last [`LOG_TAIL_LINES`] non-empty lines of the log joined with ` | `, so that an error
/// stays one line.
fn read_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::from("(empty log)");
    }
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join(" | ")
}
