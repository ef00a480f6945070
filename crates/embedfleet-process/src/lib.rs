//! Server child processes: what `embedfleet serve` needs to run its own `nats-server`, and what
//! the testkit needs to run real `nats-server` and `redis-server` instances for the tests. One
//! implementation for both, so the binary lookup, the free-port race and the bounded readiness
//! wait are written (and fixed) once.
//!
//! - [`binary`]: [`ServerBinary`], finding a server binary (an environment override, `PATH`,
//!   the system directories), with an install hint when it is missing.
//! - [`port`]: picking a free loopback port and probing one.
//! - [`process`]: [`ServerProcess`], a child on a fixed port with its own temporary directory:
//!   spawn, wait until *it* listens, stop, restart on the same port, kill on drop.
//! - [`nats`]: the command line of a `nats-server` with JetStream in such a directory.
//! - [`error`]: the one error type, [`ProcessError`]; every message is one line.
//!
//! std only (no async runtime): the waits are short and bounded, so callers in async code run
//! them in `spawn_blocking` or before entering the runtime.

pub mod binary;
pub mod error;
pub mod nats;
pub mod port;
pub mod process;

pub use binary::ServerBinary;
pub use error::ProcessError;
pub use process::{ServerProcess, SpawnOptions};
