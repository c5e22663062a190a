//! Nothing acknowledged is lost: restarts, SIGKILL with deliveries in flight, group commit, and
//! a store that cannot write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{lox24_event, LoopExt4, NotifySocket, Options, Server, Tmpfs};
use serde_json::json;

fn uuid_for(round: usize, i: usize) -> String {
    format!("{round:08x}-0000-4000-8000-{i:012x}")
}

fn phone_for(round: usize, i: usize) -> String {
    format!("+4915{round:02}{i:07}")
}

/// A server in `dir` that reports to a notification socket, as under systemd, with a watchdog
/// expecting a ping within `watchdog_timeout`.
fn start_watched(
    dir: Arc<tempfile::TempDir>,
    watchdog_timeout: Duration,
    options: Options,
) -> (NotifySocket, Server) {
    let notify = NotifySocket::new();
    let mut env = vec![
        ("NOTIFY_SOCKET".into(), notify.path.clone()),
        (
            "WATCHDOG_USEC".into(),
            watchdog_timeout.as_micros().to_string(),
        ),
    ];
    env.extend(options.env.iter().cloned());
    let server = Server::start_in(dir, Options { env, ..options });
    (notify, server)
}

/// Retries a delivery as a provider would, every 100 ms for up to 15 s; whether it got a 200.
async fn retried_until_accepted(server: &Server, delivery: &str) -> bool {
    for _ in 0..150 {
        match server.try_lox24(delivery.to_owned()).await {
            Some(200) => return true,
            Some(500 | 503) | None => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(other) => panic!("retry answered {other}"),
        }
    }
    false
}

#[tokio::test]
async fn acknowledged_events_survive_a_graceful_restart() {
    let mut server = Server::start(Options::default());
    for i in 0..20 {
        let reply = server
            .lox24(lox24_event(
                &uuid_for(0, i),
                &phone_for(0, i),
                1_700_000_000 + i as i64,
            ))
            .await;
        assert_eq!(reply.status, 200);
    }
    let before = server.get("/v1/phones/+4915000000007").await.json();
    let status = server.terminate();
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}");
    server.restart();
    assert!(
        !server.logs().contains("replayed the write-ahead log"),
        "a clean stop checkpoints and leaves nothing to replay:\n{}",
        server.logs()
    );
    assert_eq!(server.get("/v1/phones/+4915000000007").await.json(), before);
    for i in 0..20 {
        let record = server
            .get(&format!("/v1/phones/{}", phone_for(0, i)))
            .await
            .json();
        assert_eq!(record["suppressed"], true, "{i}");
    }
}

/// A crash loop: concurrent deliveries race a SIGKILL at a random point, ten times over; every
/// delivery answered 200 must be there after each restart, and the store must open cleanly each
/// time. The seed is printed so a failing sequence can be replayed (`CRASH_SEED=…`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_event() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("CRASH_SEED={seed}");
    let mut random = seed;
    let mut next_delay_ms = move || {
        // xorshift64: enough to spread kill points over the delivery stream.
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        150 + random % 600
    };
    let mut server = Server::start(Options::default());
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for round in 1..=10 {
        let shared = Arc::new(server);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let senders: Vec<_> = (0..16)
            .map(|sender| {
                let (shared, acked) = (shared.clone(), acked.clone());
                tokio::spawn(async move {
                    for n in 0..100_000 {
                        let i = sender * 100_000 + n;
                        let (id, phone) = (uuid_for(round, i), phone_for(round, i));
                        let body = lox24_event(&id, &phone, 1_700_000_000);
                        match tokio::time::timeout(Duration::from_secs(10), shared.try_lox24(body))
                            .await
                        {
                            Ok(Some(200)) => acked.lock().unwrap().push((id, phone)),
                            _ => break,
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(next_delay_ms())).await;
        shared.signal(libc::SIGKILL);
        for sender in senders {
            sender.await.unwrap();
        }
        server = Arc::try_unwrap(shared).unwrap_or_else(|_| panic!("server still shared"));
        server.reap();
        let this_round = std::mem::take(&mut *acked.lock().unwrap());
        assert!(
            !this_round.is_empty(),
            "round {round}: no delivery was acknowledged before the kill"
        );
        acknowledged.extend(this_round);

        server.restart();
        for chunk in acknowledged.chunks(10_000) {
            let phones: Vec<&str> = chunk.iter().map(|(_, phone)| phone.as_str()).collect();
            let reply = server
                .api("POST", "/v1/check", json!({ "phones": phones }).to_string())
                .await;
            let results = reply.json()["results"].as_array().unwrap().clone();
            for ((id, phone), result) in chunk.iter().zip(results) {
                assert_eq!(
                    result["suppressed"], true,
                    "round {round}: acknowledged {id} for {phone} was lost"
                );
            }
        }
        let (id, phone) = acknowledged.last().unwrap();
        let history = server
            .get(&format!("/v1/phones/{phone}/history"))
            .await
            .json();
        assert_eq!(history["events"][0]["event_id"], id.as_str());
    }
}

/// Concurrent deliveries share flushes instead of paying one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_flushes() {
    let server = Arc::new(Server::start(Options::default()));
    let flushes_before = server
        .metric("suppressd_store_flush_duration_seconds_count")
        .await;
    let deliveries: Vec<_> = (0..256)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                server
                    .lox24(lox24_event(
                        &uuid_for(9, i),
                        &phone_for(9, i),
                        1_700_000_000,
                    ))
                    .await
                    .status
            })
        })
        .collect();
    for delivery in deliveries {
        assert_eq!(delivery.await.unwrap(), 200);
    }
    let flushes = server
        .metric("suppressd_store_flush_duration_seconds_count")
        .await
        - flushes_before;
    let committed = server
        .metric("suppressd_store_committed_requests_total")
        .await;
    assert_eq!(committed, 256.0);
    assert!(
        flushes < 256.0,
        "256 concurrent deliveries took {flushes} flushes"
    );
}

/// A full disk makes deliveries fail with 500 (so the provider retries) and lookups keep
/// answering; once space returns, the store reopens itself and retries succeed, with every
/// acknowledged event still there, also after a restart.
#[tokio::test]
async fn a_full_disk_answers_500_and_the_store_recovers_when_space_returns() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let Some(_tmpfs) = Tmpfs::mount(&dir.path().join("data"), "48m") else {
        panic!("a_full_disk_answers_500_and_the_store_recovers_when_space_returns: mounting a tmpfs needs root; run the suite as root with .ci/run");
    };
    let (notify, server) = start_watched(
        dir.clone(),
        Duration::from_secs(1),
        Options {
            sendios: true,
            ..Options::default()
        },
    );
    assert_eq!(
        server
            .lox24(lox24_event(
                &uuid_for(7, 0),
                &phone_for(7, 0),
                1_700_000_000
            ))
            .await
            .status,
        200
    );
    let mut filler = std::fs::File::create(dir.path().join("data/filler")).unwrap();
    let block = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut filler, &block).is_ok() {}
    let _ = std::io::Write::write_all(&mut filler, &[0u8; 4096]);

    let mut failed = None;
    for i in 1..500 {
        let reply = server
            .lox24(lox24_event(
                &uuid_for(7, i),
                &phone_for(7, i),
                1_700_000_000,
            ))
            .await;
        if reply.status != 200 {
            failed = Some((i, reply));
            break;
        }
    }
    let (failed_at, failed) = failed.expect("a full disk never failed a delivery");
    assert_eq!(failed.status, 500);
    assert!(failed.json()["error"]
        .as_str()
        .unwrap()
        .contains("nothing was acknowledged"));
    let lookup = server.get(&format!("/v1/phones/{}", phone_for(7, 0))).await;
    assert_eq!(lookup.status, 200);
    assert_eq!(lookup.json()["suppressed"], true);
    assert!(server.metric("suppressd_store_write_failures_total").await >= 1.0);
    // The watchdog keeps being pinged: a restart would not free the disk, and would stop the
    // lookups while the database opens again.
    notify.clear();
    let full_since = Instant::now();
    notify.wait_for("WATCHDOG=1");
    notify.wait_for("WATCHDOG=1");
    assert!(full_since.elapsed() < Duration::from_secs(3));

    // A batch that cannot be stored is stored not at all: 500, and none of its accounts changed.
    let lost = |account: &str| json!({"event": "sms_lost", "client_user_id": account, "project_id": 5, "sms_id": account});
    let batch = json!({"0": lost("first"), "1": lost("second")});
    assert_eq!(server.sendios(batch.to_string()).await.status, 500);
    for account in ["first", "second"] {
        let record = server
            .get(&format!("/v1/accounts/sendios:5/{account}"))
            .await
            .json();
        assert_eq!(record["suppressed"], false, "{account}");
    }
    assert!(server.metric("suppressd_webhook_requests_total{source=\"lox24\",outcome=\"rejected\",status=\"500\"}").await >= 1.0);
    let acknowledged: Vec<usize> = (0..500).filter(|&i| i == 0 || i < failed_at).collect();

    // Space returns: the provider's retries of the refused deliveries go through again.
    drop(filler);
    std::fs::remove_file(dir.path().join("data/filler")).unwrap();
    let retry = lox24_event(
        &uuid_for(7, failed_at),
        &phone_for(7, failed_at),
        1_700_000_000,
    );
    assert!(
        retried_until_accepted(&server, &retry).await,
        "no delivery succeeded after space returned:\n{}",
        server.logs()
    );
    assert!(server.metric("suppressd_store_reopens_total").await >= 1.0);
    assert!(server
        .logs()
        .contains("database reopened; writes are accepted again"));
    assert_eq!(server.get("/healthz").await.status, 200);
    assert_eq!(server.sendios(batch.to_string()).await.status, 200);
    let mut server = server;
    for round in 0..2 {
        for &i in acknowledged.iter().chain([&failed_at]) {
            let lookup = server.get(&format!("/v1/phones/{}", phone_for(7, i))).await;
            assert_eq!(
                lookup.json()["suppressed"],
                true,
                "number {i}, round {round}"
            );
        }
        for account in ["first", "second"] {
            let history = server
                .get(&format!("/v1/accounts/sendios:5/{account}/history"))
                .await
                .json();
            let events = history["events"].as_array().unwrap();
            assert_eq!(events.len(), 1, "{account}, round {round}");
        }
        // What the recovered store acknowledged is on disk: it survives a restart.
        assert!(server.terminate().success(), "{}", server.logs());
        server.restart();
    }
}

/// A data directory that turns read-only under the running service (ext4 remounting itself
/// read-only after an I/O error): deliveries get 500, lookups keep answering and the watchdog
/// keeps being pinged; once the file system is repaired and mounted again, the store reopens
/// itself and every acknowledged event is there, also after a restart.
#[tokio::test]
async fn a_data_directory_turned_read_only_answers_500_and_recovers_once_repaired() {
    const TEST: &str = "a_data_directory_turned_read_only_answers_500_and_recovers_once_repaired";
    common::require_tools(TEST, &["mkfs.ext4", "e2fsck", "losetup"]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let Some(fs) = LoopExt4::mount(&dir.path().join("fs.img"), &dir.path().join("data"), 64) else {
        panic!(
            "{TEST}: loop-mounting a file system needs root; run the suite as root with .ci/run"
        );
    };
    let (notify, mut server) =
        start_watched(dir.clone(), Duration::from_secs(1), Options::default());
    let deliver = |i: usize| lox24_event(&uuid_for(9, i), &phone_for(9, i), 1_700_000_000);
    for i in 0..20 {
        assert_eq!(server.lox24(deliver(i)).await.status, 200, "delivery {i}");
    }

    fs.fail();
    let refused = server.lox24(deliver(20)).await;
    assert_eq!(refused.status, 500, "{}", server.logs());
    assert!(refused.json()["error"]
        .as_str()
        .unwrap()
        .contains("nothing was acknowledged"));
    assert_eq!(server.lox24(deliver(21)).await.status, 500);
    for i in [0, 19] {
        let lookup = server.get(&format!("/v1/phones/{}", phone_for(9, i))).await;
        assert_eq!(lookup.status, 200);
        assert_eq!(lookup.json()["suppressed"], true, "number {i}");
    }
    notify.clear();
    let read_only_since = Instant::now();
    notify.wait_for("WATCHDOG=1");
    notify.wait_for("WATCHDOG=1");
    assert!(read_only_since.elapsed() < Duration::from_secs(3));
    // Watchdog barriers write nothing, and do not count as writes working again.
    assert!(
        !server.logs().contains("store writes succeed again"),
        "{}",
        server.logs()
    );

    fs.repair();
    assert!(
        retried_until_accepted(&server, &deliver(20)).await,
        "no delivery succeeded after the file system was repaired:\n{}",
        server.logs()
    );
    assert!(server
        .logs()
        .contains("database reopened; writes are accepted again"));
    for round in 0..2 {
        for i in 0..=20 {
            let lookup = server.get(&format!("/v1/phones/{}", phone_for(9, i))).await;
            assert_eq!(
                lookup.json()["suppressed"],
                true,
                "number {i}, round {round}"
            );
        }
        assert!(server.terminate().success(), "{}", server.logs());
        server.restart();
    }
}

/// A reopen lasts as long as a start's open, which grows with the list: here longer than the
/// watchdog's timeout. The committer holds requests meanwhile, so its barrier does not come back
/// in time; the watchdog must be pinged anyway, saying why (a restart would only begin the same
/// open again), and never withheld.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_pinged_through_a_reopen_longer_than_its_timeout() {
    const TEST: &str = "the_watchdog_is_pinged_through_a_reopen_longer_than_its_timeout";
    const REOPENING: &str = "STATUS=reopening the database after a storage failure";
    const WATCHDOG_TIMEOUT: Duration = Duration::from_millis(250);
    const NUMBERS: usize = 40_000;
    common::require_tools(TEST, &["mkfs.ext4", "e2fsck", "losetup"]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let Some(fs) = LoopExt4::mount(&dir.path().join("fs.img"), &dir.path().join("data"), 256)
    else {
        panic!(
            "{TEST}: loop-mounting a file system needs root; run the suite as root with .ci/run"
        );
    };
    let (notify, server) = start_watched(dir.clone(), WATCHDOG_TIMEOUT, Options::default());
    // A list whose open takes longer than the watchdog's timeout (~1.8 s in a debug build).
    let list: String = (0..NUMBERS).map(|i| phone_for(7, i) + "\n").collect();
    let imported = server
        .api_with("POST", "/v1/import", &[("content-type", "text/csv")], list)
        .await;
    assert_eq!(imported.json()["added"], NUMBERS, "{}", imported.text);

    let deliver = lox24_event(&uuid_for(7, 0), &phone_for(8, 0), 1_700_000_000);
    fs.fail();
    assert_eq!(server.lox24(deliver.clone()).await.status, 500);
    notify.clear();
    fs.repair();
    assert!(
        retried_until_accepted(&server, &deliver).await,
        "no delivery succeeded after the file system was repaired:\n{}",
        server.logs()
    );

    let logs = server.logs();
    let reopen = logs
        .lines()
        .skip_while(|l| !l.contains("reopening the database to recover"))
        .take_while(|l| !l.contains("database reopened"))
        .collect::<Vec<_>>()
        .join("\n");
    let took = logs
        .lines()
        .find(|l| l.contains("database reopened"))
        .and_then(|l| l.split("elapsed_ms=").nth(1))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or_else(|| panic!("no reopen logged:\n{logs}"));
    assert!(
        took > WATCHDOG_TIMEOUT,
        "the reopen took {took:?}, too short to show anything:\n{logs}"
    );
    assert!(!reopen.contains("withholding the watchdog ping"), "{logs}");
    // Every ping since the failure, each with the time it arrived: those during the reopen say
    // so, and none is further from the one before than the watchdog's timeout.
    let pings: Vec<(Instant, bool)> = notify
        .take_all()
        .into_iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, m)| (at, m.lines().any(|l| l == REOPENING)))
        .collect();
    let during: Vec<Instant> = pings.iter().filter(|p| p.1).map(|p| p.0).collect();
    assert!(
        during.len() as u128 >= took.as_millis() / WATCHDOG_TIMEOUT.as_millis(),
        "{} pings said the database was being reopened during a reopen of {took:?}",
        during.len()
    );
    let first = pings.iter().position(|p| p.1).unwrap();
    for pair in pings[first..].windows(2) {
        assert!(
            pair[1].0 - pair[0].0 < WATCHDOG_TIMEOUT,
            "{:?} between pings around the reopen of {took:?}",
            pair[1].0 - pair[0].0
        );
    }
    assert_eq!(
        server
            .metric("suppressd_suppressed_subjects{type=\"phone\"}")
            .await,
        (NUMBERS + 1) as f64
    );
}
