//! Startup: refusals with one clear line, and the out-of-the-box self-signed certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{run_to_exit, Options, Server, Tmpfs};

/// `serve` on `data` with ephemeral loopback webhooks and the given API address.
fn serve_args<'a>(data: &'a str, api_listen: &'a str) -> [&'a str; 7] {
    [
        "serve",
        "--data-dir",
        data,
        "--webhook-listen",
        "127.0.0.1:0",
        "--api-listen",
        api_listen,
    ]
}

/// Asserts a failed start: non-zero exit, exactly one `suppressd:` line containing `needle`, and
/// no panic output.
fn assert_refused(args: &[&str], needle: &str) -> Option<i32> {
    let (status, stderr) = run_to_exit(args);
    assert!(!status.success(), "{args:?} should fail; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("suppressd: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not in {:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    status.code()
}

#[test]
fn refuses_half_a_tls_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "x").unwrap();
    let cert = cert.to_str().unwrap();
    let base = serve_args(data, "127.0.0.1:0");
    assert_refused(&[&base[..], &["--tls-cert", cert]].concat(), "--tls-key");
    assert_refused(&[&base[..], &["--tls-key", cert]].concat(), "--tls-cert");
    assert_refused(
        &[
            &base[..],
            &["--tls-cert", cert, "--tls-key", "/nonexistent/key.pem"],
        ]
        .concat(),
        "certificate",
    );
}

#[test]
fn refuses_an_open_api_on_a_public_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = serve_args(data.to_str().unwrap(), "0.0.0.0:0");
    assert_eq!(
        assert_refused(&args, "--api-token-file"),
        Some(1),
        "configuration problems exit 1"
    );
}

#[test]
fn environment_variables_configure_flags() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::binary())
        .args(["serve", "--webhook-listen", "127.0.0.1:0"])
        .env("SUPPRESSD_DATA_DIR", dir.path().join("data"))
        .env("SUPPRESSD_API_LISTEN", "0.0.0.0:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("--api-listen 0.0.0.0:0 is not a loopback address"));
}

#[test]
fn reports_a_port_in_use_and_creates_nothing_in_the_data_dir() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = serve_args(data.to_str().unwrap(), &addr);
    assert_refused(&args, "already in use");
    assert!(
        !data.exists(),
        "a start that cannot listen leaves no data directory"
    );
}

/// The API listens on one socket per thread (SO_REUSEPORT), which would let a second copy of
/// suppressd share a port silently: it is refused like any other port in use, and every thread
/// of the first keeps answering.
#[tokio::test]
async fn a_second_service_on_the_api_port_is_refused_and_every_api_thread_answers() {
    let server = Server::start(Options {
        extra: vec!["--api-threads".into(), "3".into()],
        ..Options::default()
    });
    server.wait_for_log("api_threads=3").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let api = server.api.to_string();
    assert_refused(&serve_args(data.to_str().unwrap(), &api), "already in use");
    // The kernel spreads connections over the threads' sockets; 30 new connections reach all
    // of them, and every one is answered.
    for _ in 0..30 {
        let reply = server.get("/v1/phones/%2B4930123456").await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
}

/// The log says which providers are on and where; a plain-HTTP request on the TLS port is told
/// to use HTTPS instead of seeing the connection reset.
#[tokio::test]
async fn says_which_providers_are_enabled_and_answers_plain_http_with_a_hint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(Options {
        sendios: true,
        ..Options::default()
    });
    let logs = server.logs();
    assert!(logs.contains("lox24 enabled at /webhooks/lox24"), "{logs}");
    assert!(
        logs.contains("sendios enabled at /webhooks/sendios"),
        "{logs}"
    );
    assert!(!logs.contains("tencent enabled"), "{logs}");

    let mut plain = tokio::net::TcpStream::connect(server.webhook)
        .await
        .unwrap();
    plain
        .write_all(b"POST /webhooks/lox24 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("https://"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(json["error"].as_str().unwrap().contains("HTTPS"), "{json}");
    // TLS on the same port is unaffected.
    assert_eq!(server.lox24(common::lox24_seed()).await.status, 200);
}

#[test]
fn reports_a_locked_database() {
    let server = Server::start(Options::default());
    let data = server.data_dir.to_str().unwrap().to_owned();
    let args = serve_args(&data, "127.0.0.1:0");
    assert_eq!(
        assert_refused(&args, "locked"),
        Some(3),
        "database problems exit 3"
    );
}

#[test]
fn reports_a_corrupt_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/db");
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("conf"), b"this is not a sled configuration").unwrap();
    std::fs::write(db.join("db"), vec![0xA5; 4096]).unwrap();
    let data = dir.path().join("data");
    let args = serve_args(data.to_str().unwrap(), "127.0.0.1:0");
    assert_eq!(
        assert_refused(&args, "corrupt"),
        Some(3),
        "database problems exit 3"
    );
}

#[tokio::test]
async fn generates_a_self_signed_certificate_once_and_reuses_it() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let options = Options {
        tls_files: false,
        ..Options::default()
    };
    let mut server = Server::start_in(dir.clone(), options);
    let fingerprint = |logs: &str| {
        let line = logs
            .lines()
            .find(|l| l.contains("fingerprint"))
            .expect("fingerprint warning");
        assert!(line.contains("WARN"), "{line}");
        let start = line.find("fingerprint ").unwrap() + "fingerprint ".len();
        line[start..start + 95].to_owned()
    };
    let first = fingerprint(&server.logs());
    assert!(server
        .logs()
        .contains("generated a self-signed certificate"));
    assert!(server.data_dir.join("tls/cert.pem").exists());
    // The client trusts only the generated certificate, so this proves it is served.
    assert_eq!(server.lox24(common::lox24_seed()).await.status, 200);
    assert!(server.terminate().success());
    let before = server.logs().len();
    server.restart();
    let logs = server.logs()[before..].to_owned();
    assert!(
        !logs.contains("generated a self-signed certificate"),
        "{logs}"
    );
    assert_eq!(fingerprint(&logs), first);
    assert_eq!(
        server.lox24(common::lox24_seed()).await.json()["status"],
        "duplicate"
    );
}

#[tokio::test]
async fn a_name_that_resolves_only_to_loopback_is_loopback() {
    let server = Server::start(Options {
        api_listen: "localhost:0",
        ..Options::default()
    });
    assert_eq!(server.get("/healthz").await.status, 200);
}

/// A secret file every user can read is warned about; the secret itself never reaches the log,
/// not even when a wrong one is presented.
#[tokio::test]
async fn world_readable_secret_is_warned_about_and_never_logged() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let secret_path = dir.path().join("open.secret");
    std::fs::write(&secret_path, common::SECRET).unwrap();
    std::fs::set_permissions(
        &secret_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let server = Server::start_in(
        dir,
        Options {
            lox24: false,
            extra: vec![
                "--lox24-secret-file".into(),
                secret_path.display().to_string(),
            ],
            ..Options::default()
        },
    );
    let wrong = server
        .webhook(
            "/webhooks/lox24",
            &[("authorization", "Bearer a-wrong-guess")],
            "{}",
        )
        .await;
    assert_eq!(wrong.status, 403);
    let logs = server.logs();
    assert!(logs.contains("is readable by every user"), "{logs}");
    assert!(!logs.contains(common::SECRET), "the secret was logged");
    assert!(
        !logs.contains("a-wrong-guess"),
        "a presented credential was logged"
    );
}

/// A data directory on a read-only filesystem: one line that names the cause, exit 3 (the
/// database), never a service that runs and silently acknowledges nothing. (A filesystem cannot
/// be remounted read-only here while the service holds files open for writing, so the running
/// case is the full disk in tests/durability.rs.)
#[test]
fn a_read_only_data_dir_is_refused_at_start_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("ro");
    let Some(_tmpfs) = Tmpfs::mount(&mount_point, "8m") else {
        panic!("a_read_only_data_dir_is_refused_at_start: mounting a tmpfs needs root; run the suite as root with .ci/run");
    };
    let data = mount_point.join("data");
    std::fs::create_dir(&data).unwrap();
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mount_point)
        .status()
        .unwrap();
    assert!(remounted.success());
    let code = assert_refused(
        &serve_args(data.to_str().unwrap(), "127.0.0.1:0"),
        "Read-only file system",
    );
    assert_eq!(code, Some(3));
}
