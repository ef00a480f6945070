//! The fleet against a NATS and a Redis that require credentials and TLS: real servers, with a
//! CA, server and client certificates made for the test (rcgen), and real minilm.
//!
//! - NATS with mutual TLS and users (with passwords, with nkeys) that hold the least-privilege
//!   permissions of deploy/nats/permissions.conf: without credentials or without the CA a role
//!   exits 1 with one line that says why; with them a coordinator (user + password from a file)
//!   and a worker (nkey seed) serve, `embed --nats-url` (password from the environment), the
//!   Rust client (nkey) and `bench fleet` get vectors, and a client cannot queue a job.
//! - Redis over TLS only, with client certificates and an ACL user limited to the cache's keys
//!   and commands: without the password the coordinator exits 1, with it the cache writes there.
//! - NATS with a token, and NATS in operator mode with a credentials file (JWTs signed here):
//!   `serve` and the Rust client get in with them, not without.
//!
//! One test binary, servers started once per mode, so the whole costs a few model loads.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine;
use embedfleet_client::{ClientError, EmbedClient, NatsAuth, NatsSecurity, NatsTls, Secret};
use embedfleet_testkit::{NatsServer, RedisServer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use support::{embedfleet, start_role};

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, as PEM files.
struct Pki {
    dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "embedfleet test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, "embedfleet test");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(vec!["fleet".into()], ExtendedKeyUsagePurpose::ClientAuth);
        let file = |name: &str, pem: &str| write_file(dir.path(), name, pem);
        Pki {
            ca: file("ca.pem", &ca_cert.pem()),
            server_cert: file("server.pem", &server_cert),
            server_key: file("server.key", &server_key),
            client_cert: file("client.pem", &client_cert),
            client_key: file("client.key", &client_key),
            dir,
        }
    }

    /// `tls { ... }` of a nats-server that requires client certificates.
    fn nats_tls_block(&self) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        )
    }

    fn nats_flags(&self) -> Vec<String> {
        flags(&[
            ("--nats-tls-ca", &self.ca),
            ("--nats-tls-cert", &self.client_cert),
            ("--nats-tls-key", &self.client_key),
        ])
    }

    fn nats_tls(&self) -> NatsTls {
        NatsTls {
            ca_file: Some(self.ca.clone()),
            cert_file: Some(self.client_cert.clone()),
            key_file: Some(self.client_key.clone()),
        }
    }
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn flags(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

fn run(args: &[String], env: &[(&str, &str)]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = embedfleet(&args);
    command.envs(env.iter().copied());
    command.output().expect("run embedfleet")
}

/// Exit status 1 and exactly one `error:` line on stderr, mentioning each needle and never
/// `secret`.
fn assert_refused(output: &Output, needles: &[&str], secret: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    for needle in needles {
        assert!(errors[0].contains(needle), "{needle:?} in {stderr}");
    }
    assert!(!stderr.contains(secret), "the secret leaked: {stderr}");
}

/// The fused vectors `embed --nats-url` printed, one per line.
fn printed_vectors(output: &Output) -> Vec<Vec<f32>> {
    assert!(
        output.status.success(),
        "embed failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            support::vector(&value["embedding"])
        })
        .collect()
}

/// The test's own Redis user: the fleet's may not even count the keys.
const INSPECTOR_PASSWORD: &str = "inspector-pw-0c4d";

/// `DBSIZE` of a TLS Redis, as `user`.
fn redis_dbsize(url: &str, pki: &Pki, user: &str, password: &str) -> u64 {
    let info = redis::IntoConnectionInfo::into_connection_info(url).expect("url");
    let settings = info
        .redis_settings()
        .clone()
        .set_username(user)
        .set_password(password);
    let client = redis::Client::build_with_tls(
        info.set_redis_settings(settings),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&pki.client_cert).expect("cert"),
                client_key: std::fs::read(&pki.client_key).expect("key"),
            }),
            root_cert: Some(std::fs::read(&pki.ca).expect("ca")),
        },
    )
    .expect("redis client");
    let mut connection = client.get_connection().expect("connect to redis");
    redis::cmd("DBSIZE").query(&mut connection).expect("DBSIZE")
}

#[test]
fn user_password_and_nkey_over_mutual_tls_with_a_tls_redis() {
    let pki = Pki::new();
    let secrets = pki.dir.path();
    let nats_password = "nats-pw-7f3a";
    let password_file = write_file(secrets, "nats-password", &format!("{nats_password}\n"));
    let app_password = "app-pw-22b0";
    let app_password_file = write_file(secrets, "app-password", app_password);
    let worker_key = nkeys::KeyPair::new_user();
    let seed_file = write_file(secrets, "worker.nk", &worker_key.seed().expect("seed"));
    let client_key = nkeys::KeyPair::new_user();
    // Each user has the least-privilege permissions of its kind, as the repository ships them.
    let permissions = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/nats/permissions.conf"
    ))
    .expect("deploy/nats/permissions.conf");
    let nats = NatsServer::start_with_config(&format!(
        "{permissions}\n{}authorization {{\n  users = [\n    \
         {{ user: coordinator, password: \"{nats_password}\", \
         permissions: $EMBEDFLEET_COORDINATOR_PERMISSIONS }}\n    \
         {{ user: app, password: \"{app_password}\", permissions: $EMBEDFLEET_CLIENT_PERMISSIONS }}\n    \
         {{ nkey: {}, permissions: $EMBEDFLEET_WORKER_PERMISSIONS }}\n    \
         {{ nkey: {}, permissions: $EMBEDFLEET_CLIENT_PERMISSIONS }}\n    \
         {{ user: operator, password: \"{nats_password}-op\", \
         permissions: $EMBEDFLEET_OPERATOR_PERMISSIONS }}\n  ]\n}}\n",
        pki.nats_tls_block(),
        worker_key.public_key(),
        client_key.public_key(),
    ))
    .expect("nats-server with TLS and users");
    let url = format!("tls://127.0.0.1:{}", nats.port());

    let redis_password = "redis-pw-91c2";
    let redis_password_file = write_file(secrets, "redis-password", redis_password);
    let redis = RedisServer::start_tls(&format!(
        "tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\nuser default off\n\
         user embedfleet on >{redis_password} ~embedfleet:* +@connection +mget +set\n\
         user inspector on >{INSPECTOR_PASSWORD} ~* +@connection +dbsize\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    ))
    .expect("redis-server with TLS (Debian's is built with it)");
    let redis_url = format!("rediss://127.0.0.1:{}", redis.port());
    let redis_tls = flags(&[
        ("--redis-tls-ca", &pki.ca),
        ("--redis-tls-cert", &pki.client_cert),
        ("--redis-tls-key", &pki.client_key),
    ]);

    let coordinator = |extra: &[String]| -> Vec<String> {
        let mut args: Vec<String> = ["coordinator", "--nats-url", &url, "--models", "minilm"]
            .map(String::from)
            .to_vec();
        args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
        args.extend(extra.iter().cloned());
        args
    };
    let user_flags = {
        let mut f = vec!["--nats-user".to_string(), "coordinator".into()];
        f.extend(flags(&[("--nats-password-file", &password_file)]));
        f
    };
    let mut redis_flags = vec!["--redis-url".to_string(), redis_url.clone()];
    redis_flags.extend(["--redis-user".into(), "embedfleet".into()]);
    redis_flags.extend(redis_tls.iter().cloned());

    // No credentials: NATS says no, and the line says what to check.
    let output = run(&coordinator(&pki.nats_flags()), &[]);
    assert_refused(
        &output,
        &[
            "cannot connect to NATS",
            "authorization violation",
            "--nats-user",
        ],
        nats_password,
    );
    // Credentials but not the CA: the server's certificate is not trusted.
    let output = run(&coordinator(&user_flags), &[]);
    assert_refused(&output, &["TLS", "--nats-tls-ca"], nats_password);
    // NATS fine, Redis without its password: refused, not an outage to ride out.
    let mut no_redis_password = user_flags.clone();
    no_redis_password.extend(pki.nats_flags());
    no_redis_password.extend(redis_flags.iter().cloned());
    let output = run(&coordinator(&no_redis_password), &[]);
    assert_refused(&output, &["redis", "refused"], redis_password);

    // Everything given: the coordinator and a worker serve.
    let mut full = no_redis_password;
    full.extend(flags(&[("--redis-password-file", &redis_password_file)]));
    let args = coordinator(&full);
    let _coordinator = start_role(
        "coordinator",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut worker_args: Vec<String> = ["worker", "--nats-url", &url, "--models", "minilm"]
        .map(String::from)
        .to_vec();
    worker_args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
    worker_args.extend(flags(&[("--nats-nkey-seed-file", &seed_file)]));
    worker_args.extend(pki.nats_flags());
    let _worker = start_role(
        "worker",
        &worker_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // `embed --nats-url`, the password from the environment this time.
    let mut embed_args: Vec<String> = ["embed", "--nats-url", &url, "--nats-user", "app"]
        .map(String::from)
        .to_vec();
    embed_args.extend(pki.nats_flags());
    embed_args.extend(["a locked harbour".into(), "an open sea".into()]);
    let output = run(&embed_args, &[("EMBEDFLEET_NATS_PASSWORD", app_password)]);
    let from_cli = printed_vectors(&output);
    assert_eq!(from_cli.len(), 2);
    assert_eq!(from_cli[0].len(), support::FUSED_DIM);
    assert!(
        redis_dbsize(&redis_url, &pki, "inspector", INSPECTOR_PASSWORD) > 0,
        "the coordinator cached in the TLS Redis"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // The Rust client with its own nkey: the same vectors.
        let security = NatsSecurity {
            auth: NatsAuth::Nkey(Secret::new(client_key.seed().expect("seed"))),
            tls: pki.nats_tls(),
        };
        let client = EmbedClient::connect_with(&url, &security)
            .await
            .expect("client with an nkey");
        let vectors = client
            .embed_texts(&["a locked harbour", "an open sea"])
            .await
            .expect("embed");
        for (got, want) in vectors.iter().zip(&from_cli) {
            assert!(support::cosine(got, want) > 0.9999);
        }
        // A client may not queue jobs: the job stream would acknowledge this publish, but the
        // server drops it for want of permission, so no acknowledgement ever comes.
        let forged = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client
                .nats()
                .request("embedfleet.v1.model.minilm", "forged".into()),
        )
        .await;
        assert!(
            !matches!(forged, Ok(Ok(_))),
            "a client queued a job: {forged:?}"
        );
        // Without the client certificate the server ends the handshake.
        let no_cert = NatsSecurity {
            tls: NatsTls {
                ca_file: Some(pki.ca.clone()),
                ..NatsTls::default()
            },
            ..security
        };
        match EmbedClient::connect_with(&url, &no_cert).await {
            Err(ClientError::Connect { .. }) => {}
            other => panic!("connected without a client certificate: {other:?}"),
        }
    });

    // `bench fleet` connects with the same flags.
    let mut bench: Vec<String> = ["bench", "fleet", "--nats-url", &url, "--models", "minilm"]
        .map(String::from)
        .to_vec();
    bench.extend(["--clients", "1", "--requests", "2", "--no-warm"].map(String::from));
    bench.extend(["--nats-user".into(), "app".into()]);
    bench.extend(flags(&[("--nats-password-file", &app_password_file)]));
    bench.extend(pki.nats_flags());
    let output = run(&bench, &[]);
    assert!(
        output.status.success(),
        "bench fleet: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_token_and_a_credentials_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = "tok-5d1e";
    let token_file = write_file(dir.path(), "token", token);
    let nats = NatsServer::start_with_config(&format!("authorization {{ token: \"{token}\" }}\n"))
        .expect("nats-server with a token");
    let url = nats.url();

    let embed = |extra: &[String]| {
        let mut args: Vec<String> = ["embed", "--nats-url", &url].map(String::from).to_vec();
        args.extend(extra.iter().cloned());
        args.push("hello".into());
        run(&args, &[])
    };
    assert_refused(&embed(&[]), &["authorization violation"], token);

    let mut serve: Vec<String> = ["serve", "--nats-url", &url, "--models", "minilm"]
        .map(String::from)
        .to_vec();
    serve.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
    serve.extend(flags(&[("--nats-token-file", &token_file)]));
    let _serve = start_role(
        "serve",
        &serve.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let vectors = printed_vectors(&embed(&flags(&[("--nats-token-file", &token_file)])));
    assert_eq!(vectors[0].len(), support::FUSED_DIM);

    // Operator mode: the server trusts an operator, which signed an account, which signed the
    // user whose JWT and seed make the credentials file.
    let creds = Operator::new().creds_server(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let with_creds = NatsSecurity {
            auth: NatsAuth::CredsFile(creds.file.clone()),
            ..NatsSecurity::default()
        };
        let client = EmbedClient::connect_with(&creds.server.url(), &with_creds)
            .await
            .expect("client with a credentials file");
        client.nats().flush().await.expect("a round trip");
        match EmbedClient::connect_with(&creds.server.url(), &NatsSecurity::default()).await {
            Err(ClientError::Connect { .. }) => {}
            other => panic!("connected to an operator-mode server anonymously: {other:?}"),
        }
    });
}

/// An operator, its system account (JetStream needs one), an account and a user as nkeys, and
/// the JWTs that chain them.
struct Operator {
    operator: nkeys::KeyPair,
    system: nkeys::KeyPair,
    account: nkeys::KeyPair,
    user: nkeys::KeyPair,
}

/// A nats-server in operator mode and a credentials file it accepts.
struct CredsServer {
    server: NatsServer,
    file: PathBuf,
}

impl Operator {
    fn new() -> Operator {
        Operator {
            operator: nkeys::KeyPair::new_operator(),
            system: nkeys::KeyPair::new_account(),
            account: nkeys::KeyPair::new_account(),
            user: nkeys::KeyPair::new_user(),
        }
    }

    fn creds_server(&self, dir: &Path) -> CredsServer {
        let unlimited = serde_json::json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
        });
        let operator_jwt = jwt(
            &self.operator,
            &self.operator.public_key(),
            serde_json::json!({"type": "operator", "version": 2}),
        );
        let account_jwt = jwt(
            &self.operator,
            &self.account.public_key(),
            serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
        );
        let system_jwt = jwt(
            &self.operator,
            &self.system.public_key(),
            serde_json::json!({"type": "account", "version": 2}),
        );
        let user_jwt = jwt(
            &self.account,
            &self.user.public_key(),
            serde_json::json!({
                "type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1
            }),
        );
        let server = NatsServer::start_with_config(&format!(
            "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {system}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
            self.account.public_key(),
            system = self.system.public_key(),
        ))
        .expect("nats-server in operator mode");
        let file = write_file(
            dir,
            "user.creds",
            &format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                self.user.seed().expect("seed")
            ),
        );
        CredsServer { server, file }
    }
}

/// A NATS JWT: `{"typ":"JWT","alg":"ed25519-nkey"}`, claims issued by `issuer` about `subject`,
/// signed with the issuer's nkey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{subject}-{}", nats["type"].as_str().unwrap_or("")),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": nats["type"],
        "nats": nats,
    });
    let body = b64.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64.encode(signature))
}
