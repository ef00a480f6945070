//! Each helper against the real binary: it starts, answers its protocol, a stop makes the port
//! refuse, and a restart answers again on the same port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use embedfleet_testkit::nats::MAX_PAYLOAD;
use embedfleet_testkit::port::accepts_connections;
use embedfleet_testkit::{NatsServer, RedisServer, RoleError, RoleProcess};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    stream
}

/// Sends an inline `PING` and returns the reply line.
fn redis_ping(port: u16) -> String {
    let mut stream = connect(port);
    stream.write_all(b"PING\r\n").expect("send PING");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read reply");
    line
}

/// The first line a NATS server sends to a new client: `INFO {json}`.
fn nats_info(port: u16) -> String {
    let mut line = String::new();
    BufReader::new(connect(port))
        .read_line(&mut line)
        .expect("read INFO");
    line
}

#[test]
fn redis_starts_answers_stops_and_restarts_on_the_same_port() {
    let mut redis = RedisServer::start().expect("start redis-server");
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis_ping(port), "+PONG\r\n");

    redis.stop().expect("stop");
    assert!(
        !accepts_connections(port),
        "port {port} still open after stop"
    );
    assert!(!redis.process().is_running());

    redis.restart().expect("restart");
    assert_eq!(redis.port(), port);
    assert_eq!(redis_ping(port), "+PONG\r\n");
}

#[test]
fn nats_starts_with_jetstream_stops_and_restarts_on_the_same_port() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    let info = nats_info(port);
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains(&format!("\"port\":{port}")), "{info}");
    assert!(
        info.contains("\"jetstream\":true"),
        "JetStream not enabled: {info}"
    );

    nats.stop().expect("stop");
    assert!(
        !accepts_connections(port),
        "port {port} still open after stop"
    );

    nats.restart().expect("restart");
    assert_eq!(nats.port(), port);
    assert!(nats_info(port).starts_with("INFO {"));
    assert!(nats.store_dir().starts_with(nats.process().dir()));
}

#[test]
fn dropping_a_server_kills_it() {
    let redis = RedisServer::start().expect("start redis-server");
    let port = redis.port();
    drop(redis);
    assert!(
        !accepts_connections(port),
        "port {port} still open after drop"
    );
}

#[test]
fn servers_started_together_get_distinct_ports() {
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start().expect("start redis-server"))
        .collect();
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for port in ports {
        assert_eq!(redis_ping(port), "+PONG\r\n");
    }
}

#[test]
fn a_restart_onto_a_taken_port_fails_with_the_server_log() {
    let mut redis = RedisServer::start().expect("start redis-server");
    let port = redis.port();
    redis.stop().expect("stop");
    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("take the port");
    let message = redis.restart().expect_err("the port is taken").to_string();
    assert!(message.contains("redis-server"), "{message}");
    assert!(
        message
            .to_ascii_lowercase()
            .contains("address already in use"),
        "{message}"
    );
    drop(squatter);
    redis.restart().expect("restart once the port is free");
    assert_eq!(redis_ping(port), "+PONG\r\n");
}

/// Publishes `payload` on a subject this same connection subscribes to, in the plain text
/// protocol, and returns what came back: the delivered payload, or the server's `-ERR` line.
fn nats_echo(port: u16, payload: &[u8]) -> Result<Vec<u8>, String> {
    let stream = connect(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone the stream");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read INFO");
    assert!(line.starts_with("INFO "), "{line}");
    let info: serde_json::Value = serde_json::from_str(&line[5..]).expect("INFO is JSON");
    assert_eq!(info["max_payload"], MAX_PAYLOAD, "{line}");

    let mut out = Vec::new();
    out.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB big 1\r\n");
    out.extend_from_slice(format!("PUB big {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    // The server drops a connection that sends too much while we are still writing; what it
    // said before is then still readable.
    let sent = writer.write_all(&out);
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return Err(format!("connection closed (send: {sent:?})"));
        }
        if line.starts_with("-ERR") {
            return Err(line.trim_end().to_owned());
        }
        if line.starts_with("PING") {
            writer.write_all(b"PONG\r\n").expect("send PONG");
        }
        if let Some(header) = line.strip_prefix("MSG ") {
            let len: usize = header
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .expect("MSG ends with the payload size");
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).expect("read the payload");
            body.truncate(len);
            return Ok(body);
        }
    }
}

#[test]
fn nats_accepts_payloads_up_to_the_fleet_request_limit() {
    let mut nats = NatsServer::start().expect("start nats-server");
    // 2 MiB: over nats' 1 MiB default, under the fleet's 8 MiB limit.
    let payload: Vec<u8> = (0..2 * 1024 * 1024)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let echoed = nats_echo(nats.port(), &payload).expect("a 2 MiB message goes through");
    assert!(echoed == payload, "the 2 MiB payload came back altered");

    // The config file is read again on restart.
    nats.restart().expect("restart");
    let echoed = nats_echo(nats.port(), &payload).expect("a 2 MiB message after restart");
    assert_eq!(echoed.len(), payload.len());

    // Past the limit the server refuses the message.
    let too_big = vec![b'x'; MAX_PAYLOAD + 1];
    let error = nats_echo(nats.port(), &too_big).expect_err("over max_payload");
    assert!(error.contains("Maximum Payload"), "{error}");
}

fn shell(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

/// RoleProcess supervises any child that prints a ready line and drains on SIGTERM; a shell
/// script is the smallest such child (the real roles are driven by the CLI's fleet tests).
#[test]
fn a_role_is_ready_on_its_ready_line_and_exits_on_sigterm() {
    let script = "trap 'echo draining >&2; exit 0' TERM; echo starting; \
                  echo 'scripted role ready: models=minilm'; \
                  while true; do sleep 0.05; done";
    let mut role = RoleProcess::spawn("scripted role", shell(script)).expect("ready");
    assert_eq!(role.ready_line(), "scripted role ready: models=minilm");
    assert!(role.is_running());
    assert!(role.pid() > 0);
    let status = role.terminate().expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
    let log = role.log();
    assert!(log.contains("[out] starting"), "{log}");
    assert!(log.contains("[err] draining"), "{log}");
    assert!(!role.is_running());
}

#[test]
fn a_killed_role_reports_the_signal() {
    let mut role = RoleProcess::spawn(
        "sleeper",
        shell("echo 'sleeper ready: yes'; exec sleep 600"),
    )
    .expect("ready");
    let status = role.kill9().expect("killed");
    assert!(!status.success());
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status}");
}

#[test]
fn a_role_that_dies_before_ready_fails_fast_with_its_log() {
    let started = Instant::now();
    let error = RoleProcess::spawn("broken", shell("echo 'error: no weights' >&2; exit 3"))
        .expect_err("exits before ready");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(matches!(error, RoleError::ExitedEarly { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("error: no weights"), "{message}");
}

#[test]
fn a_role_that_never_gets_ready_times_out() {
    let error = RoleProcess::spawn_with_timeout(
        "silent",
        shell("exec sleep 600"),
        Duration::from_millis(500),
    )
    .expect_err("no ready line");
    assert!(matches!(error, RoleError::NotReady { .. }), "{error}");
}

#[test]
fn a_chatty_role_never_blocks_on_its_pipes() {
    // 4 MiB on each stream, far past a pipe's 64 KiB buffer, before and after the ready line.
    let script = "head -c 4194304 /dev/zero | tr '\\0' 'e' | fold -w 100 >&2; \
                  head -c 4194304 /dev/zero | tr '\\0' 'o' | fold -w 100; \
                  echo 'chatty ready: yes'; \
                  head -c 4194304 /dev/zero | tr '\\0' 'p' | fold -w 100; echo done";
    let mut role = RoleProcess::spawn("chatty", shell(script)).expect("ready despite the noise");
    let deadline = Instant::now() + Duration::from_secs(60);
    while role.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = role
        .try_wait()
        .expect("the child finished writing and exited");
    assert!(status.success());
    assert!(role.log().len() <= 2 << 20, "the log is bounded");
}
