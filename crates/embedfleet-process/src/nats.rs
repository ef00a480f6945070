//! How a `nats-server` with JetStream is started in a [`ServerProcess`](crate::ServerProcess)'s
//! directory: the same command line for `embedfleet serve`'s own server and the testkit's, each
//! writing its own config file (`max_payload`, and for tests monitoring, auth, TLS).

use std::ffi::OsString;
use std::path::Path;

/// The config file in the server's directory; flags given next to `-c` override it.
pub const CONFIG_FILE: &str = "nats.conf";
/// Subdirectory of the server's directory that holds the JetStream store, so a restart in the
/// same directory keeps streams and consumers.
pub const STORE_DIR: &str = "jetstream";

/// `nats-server -c <dir>/nats.conf -js -a 127.0.0.1 -p <port> -sd <dir>/jetstream`: an
/// [`ArgsFn`](crate::process::ArgsFn).
pub fn jetstream_args(port: u16, dir: &Path) -> Vec<OsString> {
    vec![
        "-c".into(),
        dir.join(CONFIG_FILE).into_os_string(),
        "-js".into(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string().into(),
        "-sd".into(),
        dir.join(STORE_DIR).into_os_string(),
    ]
}
