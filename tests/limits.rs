//! Limits against abuse on the public listener: header size, slow and idle clients, connection
//! count, JSON nesting, batch length, authentication rate limiting, and plain HTTP only when
//! asked for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{lox24_event, Options, Server, SECRET};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn with_flags(flags: &[&str]) -> Options {
    Options {
        extra: flags.iter().map(|f| f.to_string()).collect(),
        ..Options::default()
    }
}

fn auth() -> String {
    format!("Bearer {SECRET}")
}

#[tokio::test]
async fn oversized_headers_get_431_on_both_listeners() {
    let server = Server::start(Options::default());
    let huge = "x".repeat(40 * 1024);
    let reply = server
        .webhook("/webhooks/lox24", &[("x-filler", &huge)], Bytes::new())
        .await;
    assert_eq!(reply.status, 431);
    let reply = server
        .api_with("GET", "/v1/phones/+4930123456", &[("x-filler", &huge)], "")
        .await;
    assert_eq!(reply.status, 431);
    // Ordinary headers are untouched by the limit.
    let reply = server
        .lox24(lox24_event(
            "8d7f0c4e-0000-4000-8000-000000000001",
            "+4930123456",
            1_700_000_000,
        ))
        .await;
    assert_eq!(reply.status, 200);
}

/// Reads until the server closes the connection; returns how long that took.
async fn time_until_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after 10 s"),
        }
    }
}

#[tokio::test]
async fn slow_headers_and_idle_keep_alive_are_cut_off() {
    let server = Server::start(with_flags(&["--request-header-timeout", "1"]));

    // Slowloris: a byte of header every 300 ms never completes a request within the timeout.
    let mut slow = server.webhook_tls().await.unwrap();
    slow.write_all(b"POST /webhooks/lox24 HTTP/1.1\r\n")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..20 {
            if slow.write_all(b"x").await.is_err() || slow.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .unwrap();
    let _ = time_until_closed(&mut slow).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow client kept {:?}",
        started.elapsed()
    );

    // Idle keep-alive on the API: one request answered, then the connection is closed.
    let mut idle = TcpStream::connect(server.api).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_for = time_until_closed(&mut idle).await;
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(5),
        "{idle_for:?}"
    );
}

/// hyper answers HTTP/2 pings forever, so an idle HTTP/2 connection is only ended by the
/// server noticing that no request has come for the idle timeout; one that is busy is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_webhook_connections_are_closed_and_busy_ones_kept() {
    let server = Server::start(with_flags(&["--request-header-timeout", "1"]));
    let tls = server.webhook_tls().await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);

    // Requests every 400 ms for 2.4 s: longer than the timeout, never idle for it.
    let started = Instant::now();
    for _ in 0..6 {
        let response = sender.send_request(get_on_webhook_path()).await.unwrap();
        assert_eq!(response.status(), 405);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(2));
    assert!(!connection.is_finished(), "a busy connection was closed");

    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("idle HTTP/2 connection still open after 10 s")
        .unwrap()
        .ok();
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(500) && idle_for < Duration::from_secs(4),
        "{idle_for:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_while_open_ones_keep_working() {
    let server = Server::start(with_flags(&["--max-connections", "3"]));
    let mut open = Vec::new();
    for _ in 0..3 {
        let tls = server.webhook_tls().await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let response = sender.send_request(get_on_webhook_path()).await.unwrap();
        assert_eq!(response.status(), 405);
        open.push(sender);
    }
    // The fourth is closed at accept: its handshake fails.
    assert!(
        server.webhook_tls().await.is_err(),
        "fourth connection was served"
    );
    assert!(
        server
            .metric("suppressd_connections_refused_total{listener=\"webhook\"}")
            .await
            >= 1.0
    );
    for sender in &mut open {
        let response = sender.send_request(get_on_webhook_path()).await.unwrap();
        assert_eq!(response.status(), 405, "an open connection stopped working");
    }
    // Closing one frees its slot.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.webhook_tls().await.is_err() {
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A GET on the webhook path: 405, answered without touching the store.
fn get_on_webhook_path() -> hyper::Request<http_body_util::Full<Bytes>> {
    hyper::Request::get("/webhooks/lox24")
        .header("host", "localhost")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn deep_json_and_long_batches_are_400_with_a_reason() {
    let server = Server::start(Options {
        sendios: true,
        ..Options::default()
    });
    let deep = format!(
        "{{\"id\":\"8d7f0c4e-0000-4000-8000-000000000002\",\"name\":\"phone.unsubscribe\",\"x\":{}1{}}}",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let reply = server.lox24(deep).await;
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("nested deeper than 32"));

    let batch: Vec<_> = (0..10_001)
        .map(|i| json!({"event": "sms_sent", "project_id": 1, "user_id": i}))
        .collect();
    let reply = server.sendios(serde_json::to_vec(&batch).unwrap()).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("at most 10000 entries"));
}

/// A LOX24 delivery from a chosen loopback source address.
async fn lox24_from(server: &Server, source: &str, authorization: &str) -> common::Reply {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(server.webhook).await.unwrap();
    let tls = server.tls_over(tcp).await;
    let body = lox24_event(
        "8d7f0c4e-0000-4000-8000-000000000003",
        "+4930123457",
        1_700_000_000,
    );
    common::send(
        tls,
        "POST",
        "/webhooks/lox24",
        &[("authorization", authorization)],
        Bytes::from(body),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn repeated_auth_failures_from_one_address_get_429() {
    let server = Server::start(Options::default());
    for _ in 0..20 {
        let reply = lox24_from(&server, "127.0.0.1", "Bearer wrong").await;
        assert_eq!(reply.status, 403);
    }
    let reply = lox24_from(&server, "127.0.0.1", "Bearer wrong").await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after));
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("too many failed authentications"));
    // Blocked before the credential is looked at, so the right one waits too…
    assert_eq!(lox24_from(&server, "127.0.0.1", &auth()).await.status, 429);
    // …while other addresses are unaffected.
    assert_eq!(lox24_from(&server, "127.0.0.2", &auth()).await.status, 200);
    assert_eq!(
        server
            .metric("suppressd_webhook_auth_rate_limited_total")
            .await,
        2.0
    );
}

#[tokio::test]
async fn plain_http_webhooks_only_with_insecure_http() {
    let server = Server::start(Options {
        tls_files: false,
        extra: vec!["--insecure-http".into()],
        ..Options::default()
    });
    assert!(server
        .logs()
        .contains("--insecure-http: webhooks are served over plain HTTP"));
    let tcp = TcpStream::connect(server.webhook).await.unwrap();
    let body = lox24_event(
        "8d7f0c4e-0000-4000-8000-000000000004",
        "+4930123458",
        1_700_000_000,
    );
    let reply = common::send(
        tcp,
        "POST",
        "/webhooks/lox24",
        &[("authorization", &auth())],
        Bytes::from(body),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(
        !server.data_dir.join("tls").exists(),
        "no certificate needed"
    );

    // Without the flag the listener speaks TLS: the same plain request is not served, only
    // told (400) to use an https:// URL, and nothing is stored.
    let tls_server = Server::start(Options::default());
    let tcp = TcpStream::connect(tls_server.webhook).await.unwrap();
    let plain = common::send(
        tcp,
        "POST",
        "/webhooks/lox24",
        &[("authorization", &auth())],
        Bytes::from(lox24_event(
            "8d7f0c4e-0000-4000-8000-000000000005",
            "+4930123459",
            1_700_000_000,
        )),
    )
    .await
    .unwrap();
    assert_eq!(plain.status, 400, "{}", plain.text);
    let hint: serde_json::Value = serde_json::from_str(&plain.text).unwrap();
    assert!(
        hint["error"].as_str().unwrap().contains("https://"),
        "{}",
        plain.text
    );
    let lookup = tls_server.get("/v1/phones/%2B4930123459").await;
    assert_eq!(lookup.json()["suppressed"], false, "{}", lookup.text);

    // The flag contradicts a certificate.
    let (status, stderr) = common::run_to_exit(&[
        "serve",
        "--insecure-http",
        "--tls-cert",
        "a.pem",
        "--tls-key",
        "b.pem",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("--insecure-http"), "{stderr}");
}
