//! Free ports and port probes.
//!
//! A free port is found by binding `127.0.0.1:0`, reading the port the kernel chose and dropping
//! the listener before the server binds it. Between the drop and the server's bind another
//! process can take the port; that race is small but real on a busy machine, so
//! [`crate::ServerProcess::start`] recognises a server that failed to bind and retries on a new
//! port a few times.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::ProcessError;

/// How long one connection attempt of a probe may take; loopback answers in microseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Pause between probes while waiting for a port.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A port on 127.0.0.1 that was free a moment ago (see the module docs for the race).
pub fn free_port() -> Result<u16, ProcessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(ProcessError::io("binding 127.0.0.1:0 to pick a free port"))?;
    let port = listener
        .local_addr()
        .map_err(ProcessError::io("reading the port of 127.0.0.1:0"))?
        .port();
    drop(listener);
    Ok(port)
}

/// Whether something accepts TCP connections on `127.0.0.1:port` right now.
pub fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok()
}

/// Whether process `pid` holds a socket listening on `127.0.0.1:port`, read from Linux's
/// `/proc`; `None` where `/proc` cannot tell (another OS, a restricted sandbox).
///
/// A connect probe alone cannot tell whose socket answered: when a freshly spawned server loses
/// its port to another process, the probe reaches that process and the start would look
/// successful. Matching the listening socket's inode against the child's file descriptors
/// leaves no doubt.
pub fn process_listens_on(pid: u32, port: u16) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    let listening_inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, tx:rx, tr:when, retrnsmt, uid, timeout, inode
            let is_listener =
                fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A");
            is_listener.then(|| fields.get(9).map(|inode| format!("socket:[{inode}]")))?
        })
        .collect();
    if listening_inodes.is_empty() {
        return Some(false);
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| {
                listening_inodes
                    .iter()
                    .any(|s| target.as_os_str() == s.as_str())
            })
            .unwrap_or(false)
    }))
}

/// Polls until `ready()` holds or `deadline` passes; `true` when it held. `give_up()` is checked
/// on every round so that a process that died stops the wait early.
pub(crate) fn wait_until(
    deadline: Duration,
    mut ready: impl FnMut() -> bool,
    mut give_up: impl FnMut() -> bool,
) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if give_up() || start.elapsed() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_refuses_until_bound() {
        let port = free_port().expect("free port");
        assert_ne!(port, 0);
        assert!(!accepts_connections(port));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind the free port");
        assert!(accepts_connections(port));
        assert_eq!(process_listens_on(std::process::id(), port), Some(true));
        drop(listener);
        assert_ne!(process_listens_on(std::process::id(), port), Some(true));
    }
}
