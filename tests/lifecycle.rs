//! Running under a service manager: sd_notify messages on a socket the test provides, systemd
//! credentials, certificate reload on SIGHUP under load, and graceful shutdown with requests in
//! flight.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{lox24_event, NotifySocket, Options, Server, SECRET};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn event_id(n: usize) -> String {
    format!("5e1f0000-0000-4000-8000-{n:012x}")
}

fn phone(n: usize) -> String {
    format!("+4917{n:09}")
}

#[tokio::test]
async fn notify_socket_gets_ready_watchdog_reloading_and_stopping() {
    let notify = NotifySocket::new();
    let mut server = Server::start(Options {
        env: vec![
            ("NOTIFY_SOCKET".into(), notify.path.clone()),
            ("WATCHDOG_USEC".into(), "200000".into()),
        ],
        ..Options::default()
    });
    let before_ready = notify.wait_for("READY=1");
    assert!(
        before_ready
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC="))),
        "the start timeout is extended while the database opens: {before_ready:?}"
    );
    // READY=1 promises both listeners serve and the store is open.
    assert_eq!(server.get("/healthz").await.status, 200);
    let reply = server
        .lox24(lox24_event(&event_id(1), &phone(1), 1_700_000_000))
        .await;
    assert_eq!(reply.status, 200);

    // The watchdog is pinged at half of WATCHDOG_USEC while the committer answers.
    let started = Instant::now();
    notify.wait_for("WATCHDOG=1");
    notify.wait_for("WATCHDOG=1");
    assert!(started.elapsed() < Duration::from_secs(2));

    server.signal(libc::SIGHUP);
    notify.wait_for("RELOADING=1");
    notify.wait_for("READY=1");

    let status = server.terminate();
    notify.wait_for("STOPPING=1");
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}");
}

#[tokio::test]
async fn secret_files_default_to_systemd_credentials() {
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("lox24-secret"), SECRET).unwrap();
    std::fs::write(
        credentials.path().join("api-token"),
        "ops:credential-token\n",
    )
    .unwrap();
    let mut server = Server::start(Options {
        lox24: false,
        env: vec![(
            "CREDENTIALS_DIRECTORY".into(),
            credentials.path().display().to_string(),
        )],
        ..Options::default()
    });
    let reply = server
        .lox24(lox24_event(&event_id(2), &phone(2), 1_700_000_000))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(server.get("/v1/phones/+4917000000002").await.status, 401);
    server.api_token = Some("credential-token".into());
    let record = server.get("/v1/phones/+4917000000002").await.json();
    assert_eq!(record["suppressed"], true);
    assert!(server.logs().contains("using systemd credential"));
}

fn self_signed() -> (String, String) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (generated.cert.pem(), generated.key_pair.serialize_pem())
}

/// Deliveries keep succeeding — on a keep-alive connection opened before the swap and on new
/// connections — while SIGHUP swaps the certificate; new handshakes get the new one, and a bad
/// replacement keeps the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_under_load() {
    let mut server = Server::start(Options::default());
    let cert_path = server.dir.path().join("cert.pem");
    let key_path = server.dir.path().join("key.pem");
    let old_pem = std::fs::read_to_string(&cert_path).unwrap();
    let (new_pem, new_key) = self_signed();
    server.trust(&format!("{old_pem}{new_pem}"));
    let old_der = common::pem_certs(&old_pem)[0].to_vec();
    let new_der = common::pem_certs(&new_pem)[0].to_vec();
    assert_eq!(server.served_certificate().await, old_der);

    let tls = server.webhook_tls().await.unwrap();
    let (mut keep_alive, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let deliver_on_keep_alive = |n: usize| {
        hyper::Request::post("/webhooks/lox24")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {SECRET}"))
            .body(Full::new(Bytes::from(lox24_event(
                &event_id(n),
                &phone(n),
                1_700_000_000,
            ))))
            .unwrap()
    };
    let response = keep_alive
        .send_request(deliver_on_keep_alive(10))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (server, stop, outcomes) = (server.clone(), stop.clone(), outcomes.clone());
            tokio::spawn(async move {
                let mut n = 1_000 + worker * 100_000;
                while !stop.load(Ordering::Relaxed) {
                    let status = server
                        .try_lox24(lox24_event(&event_id(n), &phone(n), 1_700_000_000))
                        .await;
                    outcomes.lock().unwrap().push(status);
                    n += 1;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&key_path, &new_key).unwrap();
    std::fs::write(&cert_path, &new_pem).unwrap();
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.served_certificate().await != new_der {
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = keep_alive
        .send_request(deliver_on_keep_alive(11))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "keep-alive connection across reload"
    );

    // A certificate that does not match its key, then one that does not parse: both refused,
    // the new certificate stays in service.
    let (mismatched, _) = self_signed();
    std::fs::write(&cert_path, &mismatched).unwrap();
    server.signal(libc::SIGHUP);
    server.wait_for_log("do not form a usable pair").await;
    std::fs::write(&cert_path, "not a certificate").unwrap();
    server.signal(libc::SIGHUP);
    server.wait_for_log("holds no certificate").await;
    assert_eq!(server.served_certificate().await, new_der);
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    assert!(outcomes.len() > 20, "too little load: {}", outcomes.len());
    assert!(
        outcomes.iter().all(|status| *status == Some(200)),
        "a delivery failed during reloads: {:?}",
        outcomes
            .iter()
            .filter(|s| **s != Some(200))
            .collect::<Vec<_>>()
    );
    let logs = server.logs();
    assert!(
        logs.contains("keeping the previous TLS certificate"),
        "{logs}"
    );
    assert!(logs.contains("reloaded the TLS certificate"), "{logs}");
}

/// SIGTERM while a request's body is half sent and deliveries stream in: the half-sent request
/// is still answered 200, every acknowledged delivery is there after a restart, and the process
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_requests_and_exits_zero() {
    let server = Server::start(Options::default());
    let body = lox24_event(&event_id(20), &phone(20), 1_700_000_000);
    let (head, tail) = body.split_at(body.len() / 2);
    let mut slow = server.webhook_tls().await.unwrap();
    let headers = format!(
        "POST /webhooks/lox24 HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(headers.as_bytes()).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.flush().await.unwrap();

    let server = Arc::new(server);
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..8)
        .map(|worker| {
            let (server, acknowledged) = (server.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for n in (2_000 + worker * 100_000)..(2_000 + (worker + 1) * 100_000) {
                    match server
                        .try_lox24(lox24_event(&event_id(n), &phone(n), 1_700_000_000))
                        .await
                    {
                        Some(200) => acknowledged.lock().unwrap().push(phone(n)),
                        Some(other) => panic!("delivery answered {other} during shutdown"),
                        None => break,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.write_all(tail.as_bytes()).await.unwrap();
    slow.flush().await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut response))
        .await
        .expect("the in-flight request was not answered")
        .ok();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    for worker in load {
        worker.await.unwrap();
    }
    let mut server = Arc::try_unwrap(server).unwrap_or_else(|_| panic!("server still shared"));
    let status = server.reap().unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}");
    assert!(server.logs().contains("store flushed and closed"));

    let mut phones = acknowledged.lock().unwrap().clone();
    assert!(
        !phones.is_empty(),
        "no delivery was acknowledged before SIGTERM"
    );
    phones.push(phone(20));
    server.restart();
    for chunk in phones.chunks(10_000) {
        let reply = server
            .api("POST", "/v1/check", json!({ "phones": chunk }).to_string())
            .await;
        for (phone, result) in chunk
            .iter()
            .zip(reply.json()["results"].as_array().unwrap())
        {
            assert_eq!(result["suppressed"], true, "acknowledged {phone} was lost");
        }
    }
}
