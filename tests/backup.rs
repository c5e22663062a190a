//! The backup recipe, as the README gives it: `suppressd backup DIR` while the service takes
//! deliveries, then `suppressd serve --data-dir DIR` on the copy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{binary, lox24_event, Options, Server};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_every_number_acknowledged_before_it_began() {
    let server = Arc::new(Server::start(Options::default()));
    let list: Vec<String> = (0..5_000).map(|i| format!("+4930880{i:05}")).collect();
    let imported = server.import_list(&list).await;
    assert_eq!(imported.status, 200, "{}", imported.text);
    let acknowledged = Arc::new(Mutex::new(list));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for sender in 0..4 {
        let (server, acknowledged, stop) = (server.clone(), acknowledged.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let phone = format!("+4917{sender}{i:07}");
                let id = format!("0000{sender:04}-0000-4000-8000-{i:012}");
                let reply = server.lox24(lox24_event(&id, &phone, 1_700_000_000)).await;
                assert_eq!(reply.status, 200);
                acknowledged.lock().unwrap().push(phone);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before: Vec<String> = acknowledged.lock().unwrap().clone();
    let copy = Arc::new(tempfile::tempdir().unwrap());
    let target = copy.path().join("data");
    let api = format!("http://{}", server.api);
    let backup = tokio::task::spawn_blocking({
        let target = target.clone();
        move || {
            std::process::Command::new(binary())
                .args(["--api", &api, "backup"])
                .arg(&target)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let stdout = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "backup failed: {}{stdout}",
        String::from_utf8_lossy(&backup.stderr)
    );
    assert!(stdout.contains("restore with"), "{stdout}");
    assert!(
        acknowledged.lock().unwrap().len() > before.len(),
        "deliveries went on during the backup"
    );

    // The copy is a data directory of its own: a second service starts on it.
    let restored = Server::start_in(copy, Options::default());
    for chunk in before.chunks(5_000) {
        let checked = restored
            .api("POST", "/v1/check", json!({ "phones": chunk }).to_string())
            .await
            .json();
        for (phone, result) in chunk.iter().zip(checked["results"].as_array().unwrap()) {
            assert_eq!(
                result["suppressed"], true,
                "{phone} is missing from the copy"
            );
        }
    }
    let history = restored
        .get(&format!("/v1/phones/{}/history", before[0]))
        .await;
    assert_eq!(history.json()["events"].as_array().unwrap().len(), 1);
    assert!(restored
        .logs()
        .contains("database rebuilt from the snapshot and the log"));
    eprintln!(
        "backup under load: {} numbers acknowledged before it began, all restored; {stdout}",
        before.len()
    );

    // A backup never overwrites: the same directory again is refused.
    let again = std::process::Command::new(binary())
        .args(["--api", &format!("http://{}", server.api), "backup"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
