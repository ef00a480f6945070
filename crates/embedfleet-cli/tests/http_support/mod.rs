//! Plain HTTP/1.1 GETs for the tests of the roles' `/healthz`, `/readyz`, `/metrics` and of
//! nats-server's monitoring endpoint: std only, one request per connection, bounded by timeouts.

#![allow(dead_code)] // each test file uses a different part

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET url` (`http://host:port/path?query`): the status code and the body. `None` when
/// nothing answers (connection refused, timeout).
pub fn get(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = host.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.get(9..12)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

/// The body of a chunked response (nats-server's monitoring endpoint sends small JSON whole,
/// but a proxy or a newer server may chunk it).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A free loopback address for a role's `--http-addr`.
pub fn free_http_addr() -> String {
    let port = embedfleet_testkit::port::free_port().expect("a free port");
    format!("127.0.0.1:{port}")
}
