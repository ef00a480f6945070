//! `embedfleet probe`: GETs a role's health endpoint and exits 0 on 200, for health checks in
//! images without a shell or curl (the distroless image, compose's `healthcheck`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use clap::Args;

#[derive(Args)]
pub struct ProbeArgs {
    /// The endpoint: http://HOST:PORT/PATH (/readyz, /healthz).
    #[arg(long, default_value = "http://127.0.0.1:9090/readyz")]
    url: String,
    /// Bound on connecting and on the answer.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
}

pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url must start with http:// (got {})", args.url))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("{host}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.url))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    // The status line and a short reason are all that matter; bound what is read.
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let status = response.get(9..12).unwrap_or("");
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim();
    if status == "200" {
        println!("{}", if body.is_empty() { "ok" } else { body });
        Ok(())
    } else {
        anyhow::bail!("{} answered {status}: {body}", args.url)
    }
}
