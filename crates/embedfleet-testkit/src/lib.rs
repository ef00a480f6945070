//! Real service processes for integration tests: no mocks of NATS or Redis anywhere in the
//! project, so tests start their own `nats-server -js` and `redis-server` as child processes on
//! free loopback ports, with their state in a temporary directory, and kill them on drop.
//!
//! The system may run its own instances on the default ports; these never touch them.
//!
//! # Layout
//!
//! - [`nats`]: [`NatsServer`], `nats-server` with JetStream and a temporary store.
//! - [`redis`]: [`RedisServer`], `redis-server` with persistence off.
//! - [`process`], [`port`], [`binary`]: what both share (spawn, wait for the port, stop,
//!   restart, kill on drop; free ports; finding a binary), re-exported from the
//!   `embedfleet-process` crate, which `embedfleet serve`'s own nats-server uses too.
//!   [`TestkitError`] is its error type.
//! - [`role`]: [`RoleProcess`], an `embedfleet` role (or any command) as a child process, ready
//!   when it prints its ` ready: ` line, with its output drained into a log.
//! - [`fixed_model`]: [`FixedVectorModel`], a deterministic weight-free model for the tests of
//!   the roles around the models.
//!
//! # Example
//!
//! ```no_run
//! use embedfleet_testkit::RedisServer;
//!
//! let mut redis = RedisServer::start()?;
//! let url = redis.url(); // redis://127.0.0.1:<port>
//! redis.stop()?; // clients now see connection refused
//! redis.restart()?; // same port, so a reconnecting client finds it again
//! # Ok::<(), embedfleet_testkit::TestkitError>(())
//! ```
//!
//! The helpers use std only (no async runtime), so sync and async tests can both use them; the
//! waits they do are short and bounded.

pub mod fixed_model;
pub mod nats;
pub mod redis;
pub mod reference;
pub mod role;

pub use embedfleet_process::{binary, port, process};
/// The error of starting, stopping and restarting the servers.
pub type TestkitError = embedfleet_process::ProcessError;
pub use fixed_model::{FixedVectorModel, HangLatch};
pub use nats::NatsServer;
pub use process::ServerProcess;
pub use redis::RedisServer;
pub use reference::{reference_fixture, ReferenceFixture, ReferenceModel};
pub use role::{RoleError, RoleProcess};
