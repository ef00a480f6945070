//! A fleet role (`embedfleet serve`, `coordinator`, `worker`) as a child process of a test.
//!
//! Each role prints one line containing ` ready: ` on stdout once it serves; [`RoleProcess::spawn`]
//! waits (bounded) for that line. Two background threads keep draining stdout and stderr into a
//! bounded in-memory log, so a chatty child never blocks on a full pipe and a failed test can
//! print what the role said. The child is killed (SIGKILL) on drop.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Default bound on the wait for the ready line: loading real checkpoints on a busy 2-core
/// machine can take tens of seconds; a healthy role is ready in a few.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Default bound on a graceful shutdown after SIGTERM (draining in-flight work).
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);
/// What a role's ready line contains.
pub const READY_MARKER: &str = " ready: ";
/// The log keeps about this many bytes of the most recent output.
const LOG_LIMIT_BYTES: usize = 1 << 20;
/// How often waits check whether the child exited.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why a role could not be started or stopped as expected. Each message carries the role's log.
#[derive(Debug)]
pub enum RoleError {
    /// Spawning the process failed at the OS level.
    Spawn { name: String, source: io::Error },
    /// The child exited before printing its ready line.
    ExitedEarly {
        name: String,
        status: ExitStatus,
        log: String,
    },
    /// No ready line within the bound.
    NotReady {
        name: String,
        waited: Duration,
        log: String,
    },
    /// The child did not exit within the bound after SIGTERM (it was then killed).
    DidNotExit {
        name: String,
        waited: Duration,
        log: String,
    },
    /// Signalling or reaping the child failed.
    Io {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for RoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleError::Spawn { name, source } => write!(f, "could not spawn {name}: {source}"),
            RoleError::ExitedEarly { name, status, log } => {
                write!(
                    f,
                    "{name} exited before it was ready ({status}); its log:\n{log}"
                )
            }
            RoleError::NotReady { name, waited, log } => {
                write!(
                    f,
                    "{name} printed no ready line within {waited:?}; its log:\n{log}"
                )
            }
            RoleError::DidNotExit { name, waited, log } => write!(
                f,
                "{name} did not exit within {waited:?} of SIGTERM (killed); its log:\n{log}"
            ),
            RoleError::Io { name, what, source } => write!(f, "{what} {name}: {source}"),
        }
    }
}

impl std::error::Error for RoleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RoleError::Spawn { source, .. } | RoleError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Recent output of a child, both streams interleaved, each line tagged with its stream.
#[derive(Debug, Clone, Default)]
pub struct RoleLog(Arc<Mutex<String>>);

impl RoleLog {
    fn push(&self, stream: &str, line: &str) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.push_str(stream);
        log.push_str(line.trim_end_matches(['\n', '\r']));
        log.push('\n');
        if log.len() > LOG_LIMIT_BYTES {
            // Keep the newer half, cut at a line start so no line is torn.
            let mut cut = log.len() - LOG_LIMIT_BYTES / 2;
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            let cut = log[cut..].find('\n').map_or(cut, |n| cut + n + 1);
            log.replace_range(..cut, "[... older output dropped ...]\n");
        }
    }

    /// The output so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A running role child process. Killed with SIGKILL on drop.
#[derive(Debug)]
pub struct RoleProcess {
    name: String,
    child: Child,
    /// Kept once the child exits, so later calls report the same status.
    status: Option<ExitStatus>,
    ready_line: String,
    log: RoleLog,
    drains: Vec<JoinHandle<()>>,
}

impl RoleProcess {
    /// Spawns `command` (stdin null, stdout and stderr piped) and waits up to [`READY_TIMEOUT`]
    /// for a stdout line containing [`READY_MARKER`]. `name` labels errors and logs
    /// (e.g. `"worker minilm #1"`).
    pub fn spawn(name: impl Into<String>, command: Command) -> Result<Self, RoleError> {
        Self::spawn_with_timeout(name, command, READY_TIMEOUT)
    }

    /// [`Self::spawn`] with another bound on the wait for the ready line.
    pub fn spawn_with_timeout(
        name: impl Into<String>,
        mut command: Command,
        ready_timeout: Duration,
    ) -> Result<Self, RoleError> {
        let name = name.into();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RoleError::Spawn {
                name: name.clone(),
                source,
            })?;
        let log = RoleLog::default();
        let (ready_tx, ready_rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let drains = vec![
            drain(stdout, log.clone(), "[out] ", Some(ready_tx)),
            drain(stderr, log.clone(), "[err] ", None),
        ];
        let mut role = RoleProcess {
            name,
            child,
            status: None,
            ready_line: String::new(),
            log,
            drains,
        };

        let started = Instant::now();
        loop {
            match ready_rx.recv_timeout(POLL_INTERVAL) {
                Ok(line) => {
                    role.ready_line = line;
                    return Ok(role);
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Stdout closed without a ready line: the exit check below ends the wait.
                Err(RecvTimeoutError::Disconnected) => thread::sleep(POLL_INTERVAL),
            }
            if let Some(status) = role.try_wait() {
                // Let the drains catch the last words before quoting the log.
                role.join_drains();
                return Err(RoleError::ExitedEarly {
                    name: role.name.clone(),
                    status,
                    log: role.log(),
                });
            }
            if started.elapsed() >= ready_timeout {
                let log = role.log();
                return Err(RoleError::NotReady {
                    name: role.name.clone(),
                    waited: ready_timeout,
                    log,
                });
            }
        }
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ready line the role printed (without the line break).
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// Everything the role printed so far (bounded to the most recent ~1 MiB).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// A handle on the log that stays readable after the process is dropped.
    pub fn log_handle(&self) -> RoleLog {
        self.log.clone()
    }

    /// The exit status once the child has exited; `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the child still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// SIGKILL (a crash, not a shutdown) and reap. Returns the exit status (a signal, unless the
    /// child had already exited by itself).
    pub fn kill9(&mut self) -> Result<ExitStatus, RoleError> {
        if let Some(status) = self.try_wait() {
            return Ok(status);
        }
        // Fails only when the child already exited; `wait` reaps it either way.
        let _ = self.child.kill();
        self.wait_blocking()
    }

    /// SIGTERM, then waits up to [`TERMINATE_TIMEOUT`] for the child to drain and exit.
    pub fn terminate(&mut self) -> Result<ExitStatus, RoleError> {
        self.terminate_within(TERMINATE_TIMEOUT)
    }

    /// SIGTERM, then waits up to `timeout`; past it the child is killed and the error says so.
    pub fn terminate_within(&mut self, timeout: Duration) -> Result<ExitStatus, RoleError> {
        self.signal("TERM")?;
        self.wait_within(timeout)
    }

    /// SIGINT (Ctrl-C), then waits up to `timeout` like [`Self::terminate_within`].
    pub fn interrupt_within(&mut self, timeout: Duration) -> Result<ExitStatus, RoleError> {
        self.signal("INT")?;
        self.wait_within(timeout)
    }

    fn signal(&mut self, signal: &str) -> Result<(), RoleError> {
        if self.try_wait().is_some() {
            return Ok(());
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| RoleError::Io {
                name: self.name.clone(),
                what: "running `kill` to signal",
                source,
            })?;
        // `kill` fails when the process is already gone; the wait that follows tells.
        let _ = status;
        Ok(())
    }

    fn wait_within(&mut self, timeout: Duration) -> Result<ExitStatus, RoleError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                self.join_drains();
                return Ok(status);
            }
            if started.elapsed() >= timeout {
                let _ = self.kill9();
                return Err(RoleError::DidNotExit {
                    name: self.name.clone(),
                    waited: timeout,
                    log: self.log(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn wait_blocking(&mut self) -> Result<ExitStatus, RoleError> {
        let status = self.child.wait().map_err(|source| RoleError::Io {
            name: self.name.clone(),
            what: "reaping",
            source,
        })?;
        self.status = Some(status);
        self.join_drains();
        Ok(status)
    }

    /// Once the child is gone its pipes close and the drain threads end; a grandchild holding
    /// the pipes open could keep them alive, so this only joins threads that have finished.
    fn join_drains(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.drains.iter().any(|d| !d.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let (done, running): (Vec<_>, Vec<_>) =
            self.drains.drain(..).partition(JoinHandle::is_finished);
        for handle in done {
            let _ = handle.join();
        }
        self.drains = running;
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies `pipe` line by line into `log`; the first stdout line with [`READY_MARKER`] also goes
/// to `ready`.
fn drain(
    pipe: impl Read + Send + 'static,
    log: RoleLog,
    stream: &'static str,
    mut ready: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            log.push(stream, &text);
            if text.contains(READY_MARKER) {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(text.trim_end().to_owned());
                }
            }
        }
    })
}
