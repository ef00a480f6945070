//! Each helper against the real binary: it starts, answers its protocol, a stop makes the port
//! refuse, and a restart answers again on the same port.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use embedfleet_testkit::port::accepts_connections;
use embedfleet_testkit::{NatsServer, RedisServer};

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
