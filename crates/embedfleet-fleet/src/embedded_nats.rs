//! The `nats-server` that `embedfleet serve` starts for itself when it is given no `--nats-url`:
//! a child `nats-server -js` on a free loopback port, with its config, JetStream store and log in
//! a temporary directory, killed and removed on drop.
//!
//! The generated config raises `max_payload` to 8 MiB, the default
//! [`RequestLimits::max_payload_bytes`](embedfleet_proto::RequestLimits): with the server's own
//! default of 1 MiB, a request the coordinator would accept could never reach it.
//!
//! This mirrors the test-only `embedfleet-testkit` servers (same binary lookup, same port-race
//! retry, same bounded readiness wait) without depending on that dev-only crate. Readiness is
//! read from the child's own log ("Server is ready") as well as from a connect probe, so a port
//! taken by another process between picking it and binding it cannot pass for our server.
//!
//! ```no_run
//! use embedfleet_fleet::embedded_nats::EmbeddedNats;
//!
//! let nats = EmbeddedNats::start()?;
//! println!("NATS on {}", nats.url()); // nats://127.0.0.1:<port>
//! drop(nats); // kills the server and removes its store
//! # Ok::<(), embedfleet_fleet::embedded_nats::EmbeddedNatsError>(())
//! ```

use std::env;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable that, when set, is the path of the `nats-server` binary to run.
pub const NATS_SERVER_ENV: &str = "EMBEDFLEET_NATS_SERVER";
/// The binary's file name, looked up on `PATH`.
pub const NATS_SERVER_BINARY: &str = "nats-server";
/// `max_payload` in the generated config: 8 MiB (`MB` is binary in nats-server's config syntax),
/// equal to the default `RequestLimits::max_payload_bytes`.
pub const MAX_PAYLOAD: &str = "8MB";

/// Searched after `PATH`: Debian installs `nats-server` in `/usr/sbin`, which is not on a
/// non-root user's `PATH`.
const SYSTEM_DIRS: [&str; 3] = ["/usr/sbin", "/usr/bin", "/usr/local/bin"];
/// Bound on the wait for the server to accept connections. Generous because the machine may be
/// busy; a healthy server is ready in milliseconds.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one connect probe may take; loopback answers in microseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Fresh ports tried when another process takes the chosen port before the server binds it.
const START_ATTEMPTS: usize = 5;
/// The log lines an error message quotes.
const LOG_TAIL_LINES: usize = 6;
/// What nats-server logs once it listens for clients.
const READY_LINE: &str = "Server is ready";
const CONFIG_FILE: &str = "nats-server.conf";
const LOG_FILE: &str = "nats-server.log";
const STORE_DIR: &str = "jetstream";

/// Why the embedded server could not start. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedNatsError {
    /// No binary on `PATH`, in the system directories, or at `$EMBEDFLEET_NATS_SERVER`.
    #[error(
        "nats-server not found on PATH (or set {NATS_SERVER_ENV} to its path): install it with \
         `apt-get install nats-server` on Debian, or from \
         https://github.com/nats-io/nats-server/releases"
    )]
    NotFound,
    /// `$EMBEDFLEET_NATS_SERVER` names something that is not an executable file.
    #[error("{NATS_SERVER_ENV} is {}, which is not an executable file", .path.display())]
    BadOverride { path: PathBuf },
    /// Preparing the directory, config or log failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The binary was found but could not be run.
    #[error("could not run {}: {source}", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The server exited before it was ready; `log` is the end of its log, on one line.
    #[error("{} exited during start on port {port} ({status}): {log}", .binary.display())]
    ExitedEarly {
        binary: PathBuf,
        port: u16,
        status: String,
        log: String,
    },
    /// The server ran but did not accept connections in time; it has been killed.
    #[error("{} did not accept connections on port {port} within {waited:?}: {log}", .binary.display())]
    NotReady {
        binary: PathBuf,
        port: u16,
        waited: Duration,
        log: String,
    },
    /// Every attempt lost its port to another process.
    #[error("{} could not bind a free port in {attempts} attempts: {log}", .binary.display())]
    PortsExhausted {
        binary: PathBuf,
        attempts: usize,
        log: String,
    },
}

impl EmbeddedNatsError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| EmbeddedNatsError::Io { what, source }
    }
}

/// A child `nats-server -js` on `127.0.0.1:<free port>`, killed (and its directory removed) on
/// drop.
#[derive(Debug)]
pub struct EmbeddedNats {
    child: Child,
    port: u16,
    /// Holds the config, the JetStream store and the log; removed after the child is reaped.
    dir: TempDir,
}

impl EmbeddedNats {
    /// Finds `nats-server` (`$EMBEDFLEET_NATS_SERVER`, then `PATH`, then `/usr/sbin`, `/usr/bin`,
    /// `/usr/local/bin`), starts it with a generated config on a free loopback port and waits
    /// until it accepts connections.
    ///
    /// Blocks for as long as the server takes to start (milliseconds normally, 20 s at most);
    /// from async code, call it before entering the runtime or in `spawn_blocking`.
    pub fn start() -> Result<Self, EmbeddedNatsError> {
        let binary = locate()?;
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("embedfleet-nats-")
                .tempdir()
                .map_err(EmbeddedNatsError::io(
                    "creating the nats-server temporary directory",
                ))?;
            match spawn_and_wait(&binary, dir, free_port()?) {
                Ok(server) => return Ok(server),
                Err(EmbeddedNatsError::ExitedEarly { log, .. }) if lost_port_race(&log) => {
                    last_log = log;
                }
                Err(other) => return Err(other),
            }
        }
        Err(EmbeddedNatsError::PortsExhausted {
            binary,
            attempts: START_ATTEMPTS,
            log: last_log,
        })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log file (its stdout and stderr), for operators who want to look inside.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Where JetStream keeps its streams; removed on drop.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join(STORE_DIR)
    }

    /// The last lines of the server's log, on one line.
    pub fn log_tail(&self) -> String {
        read_tail(&self.log_path())
    }
}

impl Drop for EmbeddedNats {
    fn drop(&mut self) {
        // `kill` fails only when the child already exited; `wait` reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config the server runs with. Paths are quoted strings, escaped for the config syntax.
fn config(port: u16, store_dir: &Path) -> String {
    let store = store_dir
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        "# Generated by embedfleet (embedded nats-server).\n\
         listen: \"127.0.0.1:{port}\"\n\
         # The default 1 MiB would refuse requests the coordinator accepts (8 MiB).\n\
         max_payload: {MAX_PAYLOAD}\n\
         jetstream {{\n  store_dir: \"{store}\"\n}}\n"
    )
}

fn spawn_and_wait(
    binary: &Path,
    dir: TempDir,
    port: u16,
) -> Result<EmbeddedNats, EmbeddedNatsError> {
    let config_path = dir.path().join(CONFIG_FILE);
    fs::write(&config_path, config(port, &dir.path().join(STORE_DIR))).map_err(
        EmbeddedNatsError::io(format!("writing {}", config_path.display())),
    )?;
    let log_path = dir.path().join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(EmbeddedNatsError::io(format!(
            "opening {}",
            log_path.display()
        )))?;
    let log_err = log
        .try_clone()
        .map_err(EmbeddedNatsError::io("duplicating the log file handle"))?;
    let child = Command::new(binary)
        .arg("-js")
        .arg("-c")
        .arg(&config_path)
        // Its own process group: a Ctrl-C in the terminal signals the whole foreground group,
        // and the server must outlive serve's drain (serve kills it last, on drop).
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| EmbeddedNatsError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    // From here on the child is killed on every path out, by `EmbeddedNats`'s drop.
    let mut server = EmbeddedNats { child, port, dir };

    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(EmbeddedNatsError::ExitedEarly {
                binary: binary.to_path_buf(),
                port,
                status: status.to_string(),
                log: server.log_tail(),
            });
        }
        // The log line proves that *our* child bound the port; the probe that it answers.
        if log_says_ready(&log_path) && accepts_connections(port) {
            return Ok(server);
        }
        if started.elapsed() >= READY_TIMEOUT {
            return Err(EmbeddedNatsError::NotReady {
                binary: binary.to_path_buf(),
                port,
                waited: READY_TIMEOUT,
                log: server.log_tail(),
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The binary: the environment override, then `PATH`, then the system directories.
fn locate() -> Result<PathBuf, EmbeddedNatsError> {
    if let Some(path) = env::var_os(NATS_SERVER_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable_file(&path) {
            Ok(path)
        } else {
            Err(EmbeddedNatsError::BadOverride { path })
        };
    }
    let path_dirs = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(NATS_SERVER_BINARY))
        .find(|candidate| is_executable_file(candidate))
        .ok_or(EmbeddedNatsError::NotFound)
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A port on 127.0.0.1 that was free a moment ago. Another process may take it before the
/// server binds it; [`EmbeddedNats::start`] then retries on a new one.
fn free_port() -> Result<u16, EmbeddedNatsError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(EmbeddedNatsError::io(
        "binding 127.0.0.1:0 to pick a free port",
    ))?;
    let port = listener
        .local_addr()
        .map_err(EmbeddedNatsError::io("reading the port of 127.0.0.1:0"))?
        .port();
    Ok(port)
}

fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok()
}

fn log_says_ready(log_path: &Path) -> bool {
    fs::read_to_string(log_path)
        .map(|log| log.contains(READY_LINE))
        .unwrap_or(false)
}

/// Whether the server's log says it could not bind its port (another process took it).
fn lost_port_race(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// The last [`LOG_TAIL_LINES`] lines of the log joined with ` | `, so an error stays one line.
fn read_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut file) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::from("(empty log)");
    }
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_a_server_that_takes_8_mib_payloads() {
        let nats = tokio::task::spawn_blocking(EmbeddedNats::start)
            .await
            .expect("join")
            .expect("start the embedded nats-server (apt-get install nats-server)");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        assert_eq!(client.server_info().max_payload, 8 << 20);
        assert!(client.server_info().jetstream, "JetStream is on");

        // A request/reply round trip through the server, with a payload over NATS' 1 MiB default.
        let mut subscriber = client
            .subscribe("embedfleet.test")
            .await
            .expect("subscribe");
        let responder = client.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            if let Some(message) = subscriber.next().await {
                let reply = message.reply.expect("reply subject");
                let len = message.payload.len().to_string();
                responder.publish(reply, len.into()).await.expect("reply");
            }
        });
        let payload = vec![7u8; 2 << 20];
        let reply = client
            .request("embedfleet.test", payload.into())
            .await
            .expect("request");
        assert_eq!(&reply.payload[..], (2u32 << 20).to_string().as_bytes());

        assert!(nats
            .store_dir()
            .starts_with(nats.log_path().parent().expect("dir")));
        let port = nats.port();
        drop(client);
        drop(nats);
        assert!(!accepts_connections(port), "the server is gone after drop");
    }

    #[test]
    fn config_passes_nats_server_check() {
        let binary = locate().expect("nats-server is installed");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONFIG_FILE);
        fs::write(&path, config(4222, &dir.path().join("a \"quoted\" dir"))).expect("write");
        let output = Command::new(binary)
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()
            .expect("run nats-server -t");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn a_bad_override_is_named() {
        let message = EmbeddedNatsError::BadOverride {
            path: "/nowhere/nats-server".into(),
        }
        .to_string();
        assert!(message.contains(NATS_SERVER_ENV), "{message}");
        let message = EmbeddedNatsError::NotFound.to_string();
        assert!(message.contains("apt-get install nats-server"), "{message}");
        assert!(!message.contains('\n'));
    }
}
