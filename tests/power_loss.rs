//! Power cuts under load, with the release build operators run: the data directory is on a
//! loop-mounted ext4 that is failed (`trigger_fs_error`) 2–7 s into a load of 8 LOX24 senders
//! and an importer of 20,000-number lists. ext4 then throws away every write not yet synced, in
//! whatever order writeback had reached, as a power cut does. After `e2fsck` and a new mount,
//! every start must succeed and answer every acknowledged number as suppressed — on a data
//! directory created just before the load and on one created, stopped and synced before it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{lox24_event, release_binary, require_tools, LoopExt4, Options, Server};
use serde_json::json;

const TEST: &str = "power_cuts_under_load_never_lose_an_acknowledged_number";
const ROUNDS: usize = 5;
const SENDERS: usize = 8;
const LIST: usize = 20_000;

fn options() -> Options {
    Options {
        program: Some(release_binary()),
        ..Options::default()
    }
}

/// Runs one round; returns (numbers acknowledged, database rebuilds at the start after).
async fn run_round(
    series: usize,
    round: usize,
    fail_after: Duration,
    presynced: bool,
) -> (usize, f64) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let Some(fs) = LoopExt4::mount(&dir.path().join("fs.img"), &dir.path().join("data"), 1024)
    else {
        panic!("{TEST}: loop-mounting a file system needs root");
    };
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut server = Server::start_in(dir.clone(), options());
    if presynced {
        for i in 0..100 {
            let phone = format!("+4915{series}{round}0{i:06}");
            let id = format!("0000{series}{round}99-0000-4000-8000-{i:012}");
            let reply = server.lox24(lox24_event(&id, &phone, 1_700_000_000)).await;
            assert_eq!(reply.status, 200);
            acknowledged.lock().unwrap().push(phone);
        }
        assert!(server.terminate().success());
        assert!(std::process::Command::new("sync")
            .status()
            .unwrap()
            .success());
        server.restart();
    }
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for sender in 0..SENDERS {
        let (server, acknowledged, stop) = (server.clone(), acknowledged.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let phone = format!("+4917{series}{round}{sender:02}{i:06}");
                let id = format!("0{series}{round}{sender:02}000-0000-4000-8000-{i:012}");
                if server
                    .try_lox24(lox24_event(&id, &phone, 1_700_000_000))
                    .await
                    == Some(200)
                {
                    acknowledged.lock().unwrap().push(phone);
                }
                i += 1;
            }
        }));
    }
    load.push({
        let (server, acknowledged, stop) = (server.clone(), acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut batch = 0;
            while !stop.load(Ordering::Relaxed) {
                let phones: Vec<String> = (0..LIST)
                    .map(|i| format!("+4916{series}{round}{batch:03}{i:05}"))
                    .collect();
                let reply = server.import_list(&phones).await;
                if reply.status == 200 {
                    acknowledged.lock().unwrap().extend(phones);
                }
                batch += 1;
            }
        })
    });
    tokio::time::sleep(fail_after).await;
    fs.fail();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let Ok(mut server) = Arc::try_unwrap(server) else {
        panic!("a load task still holds the server");
    };
    server.kill();
    fs.repair();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 100,
        "series {series} round {round}: only {} acknowledged",
        acknowledged.len()
    );
    if let Err((status, logs)) = server.try_restart() {
        panic!("series {series} round {round}: the start after the power cut was refused ({status:?}):\n{logs}");
    }
    assert_eq!(server.get("/healthz").await.status, 200);
    for chunk in acknowledged.chunks(10_000) {
        let checked = server
            .api("POST", "/v1/check", json!({ "phones": chunk }).to_string())
            .await
            .json();
        let results = checked["results"].as_array().unwrap();
        assert_eq!(results.len(), chunk.len());
        for (phone, result) in chunk.iter().zip(results) {
            assert_eq!(
                result["suppressed"],
                true,
                "series {series} round {round}: {phone} was acknowledged and is lost:\n{}",
                server.logs()
            );
        }
    }
    let rebuilds = server.metric("suppressd_store_rebuilds_total").await;
    (acknowledged.len(), rebuilds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_load_never_lose_an_acknowledged_number() {
    require_tools(TEST, &["mkfs.ext4", "e2fsck", "losetup"]);
    for (series, presynced) in [(1u64, false), (2, true)] {
        for round in 0..ROUNDS {
            // Spread over 2–7 s, the same every run.
            let fail_after =
                Duration::from_millis(2_000 + (round as u64 * 1_100 + series * 500) % 5_000);
            let (acknowledged, rebuilds) =
                run_round(series as usize, round, fail_after, presynced).await;
            eprintln!(
                "{TEST}: {} data directory, round {round}: failed after {fail_after:?}, {acknowledged} acknowledged, all there; rebuilds at start: {rebuilds}",
                if presynced { "pre-synced" } else { "fresh" }
            );
        }
    }
}
