//! sled is a view: a stopped service whose database was deleted, truncated or damaged starts with
//! every record and history it had, rebuilt from the log; a torn last log record is cut, and a
//! damaged one before it refuses the start naming the file and the offset.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::{lox24_event, Options, Server};
use serde_json::{json, Value};

fn phone(i: usize) -> String {
    format!("+4930777{i:04}")
}

fn lost(account: &str, id: &str) -> Value {
    json!({"event": "sms_lost", "client_user_id": account, "project_id": 5, "sms_id": id})
}

/// Every kind of state a record can be in: unsubscribes, a redelivery, an imported list, a
/// Sendios lost streak below and one past the threshold, a manual suppression and a lift with
/// its note. Returns the API paths of the subjects.
async fn populate(server: &Server) -> Vec<String> {
    let mut paths = Vec::new();
    for i in 0..30 {
        let id = format!("7eb0{i:04}-0000-4000-8000-000000000000");
        let event = lox24_event(&id, &phone(i), 1_700_000_000 + i as i64);
        assert_eq!(server.lox24(event.clone()).await.status, 200);
        if i % 10 == 0 {
            assert_eq!(server.lox24(event).await.status, 200, "a redelivery");
        }
        paths.push(format!("/v1/phones/{}", phone(i)));
    }
    let list: Vec<String> = (100..400).map(phone).collect();
    let imported = server.import_list(&list).await;
    assert_eq!(imported.status, 200, "{}", imported.text);
    paths.extend((100..110).map(|i| format!("/v1/phones/{}", phone(i))));
    for (n, account) in [(2, "streak"), (3, "gone")] {
        for k in 0..n {
            let batch = json!({ "0": lost(account, &format!("{account}-{k}")) });
            assert_eq!(server.sendios(batch.to_string()).await.status, 200);
        }
        paths.push(format!("/v1/accounts/sendios:5/{account}"));
    }
    let held = server
        .api(
            "PUT",
            "/v1/phones/+4930777900",
            json!({"reason": "legal hold"}).to_string(),
        )
        .await;
    assert_eq!(held.status, 200, "{}", held.text);
    paths.push("/v1/phones/+4930777900".into());
    let lifted = server
        .api(
            "DELETE",
            &format!("/v1/phones/{}", phone(3)),
            json!({"note": "opted back in by SMS"}).to_string(),
        )
        .await;
    assert_eq!(lifted.status, 200, "{}", lifted.text);
    paths
}

/// The whole list: the export (every subject's events with their effect) and, for each path,
/// the record and the history as the API answers them.
async fn dump(server: &Server, paths: &[String]) -> Vec<String> {
    let mut dump = vec![server.get("/v1/export").await.text];
    for path in paths {
        dump.push(server.get(path).await.text);
        dump.push(server.get(&format!("{path}/history")).await.text);
    }
    dump
}

/// Populates a server, stops it, damages its data directory with `damage`, starts it again and
/// checks that every record and history is as before. Returns the server and its rebuild count.
async fn survives(damage: impl FnOnce(&Path)) -> (Server, f64) {
    let mut server = Server::start(Options {
        sendios: true,
        ..Options::default()
    });
    let paths = populate(&server).await;
    let before = dump(&server, &paths).await;
    assert!(before[0].lines().count() > 300, "{}", before[0]);
    assert!(server.terminate().success());
    damage(&server.data_dir);
    if let Err((status, logs)) = server.try_restart() {
        panic!("the start was refused ({status:?}):\n{logs}");
    }
    let after = dump(&server, &paths).await;
    for (was, is) in before.iter().zip(&after) {
        assert_eq!(was, is, "log:\n{}", server.logs());
    }
    let rebuilds = server.metric("suppressd_store_rebuilds_total").await;
    (server, rebuilds)
}

fn flip_byte(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    assert!(
        bytes.len() > at,
        "{} has {} bytes",
        file.display(),
        bytes.len()
    );
    bytes[at] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test]
async fn a_deleted_database_is_rebuilt_with_every_record_and_history() {
    let (server, rebuilds) =
        survives(|data| std::fs::remove_dir_all(data.join("db")).unwrap()).await;
    assert_eq!(rebuilds, 1.0);
    assert!(server
        .logs()
        .contains("database rebuilt from the snapshot and the log"));
}

#[tokio::test]
async fn a_database_whose_log_file_was_deleted_or_truncated_is_rebuilt() {
    let (_, rebuilds) = survives(|data| std::fs::remove_file(data.join("db/db")).unwrap()).await;
    assert_eq!(rebuilds, 1.0);
    let (server, rebuilds) = survives(|data| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(data.join("db/db"))
            .unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len / 3).unwrap();
    })
    .await;
    // sled may open a truncated log as an older state: then the log's tail is replayed.
    assert!(rebuilds <= 1.0);
    let aside = std::fs::read_dir(&server.data_dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("db.broken-")
        })
        .count();
    assert_eq!(aside as f64, rebuilds, "the broken database is kept aside");
}

#[tokio::test]
async fn a_byte_flipped_in_the_databases_conf_or_log_loses_nothing() {
    survives(|data| flip_byte(&data.join("db/conf"), 8)).await;
    survives(|data| {
        let file = data.join("db/db");
        let len = std::fs::metadata(&file).unwrap().len() as usize;
        flip_byte(&file, len / 2);
    })
    .await;
}

/// The newest log segment and where its intact records end.
fn newest_segment(data: &Path) -> (PathBuf, usize) {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let newest = segments.pop().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    let mut end = 32;
    while bytes[end..end + 4] == *b"SLOG" {
        let len = u32::from_le_bytes(bytes[end + 4..end + 8].try_into().unwrap()) as usize;
        end += 24 + len;
    }
    (newest, end)
}

#[tokio::test]
async fn a_torn_last_log_record_is_cut_and_the_start_succeeds() {
    let (server, _) = survives(|data| {
        let (segment, end) = newest_segment(data);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(segment)
            .unwrap();
        // A record's header and the start of its payload: a crash in the middle of an append.
        let mut torn = b"SLOG".to_vec();
        torn.extend_from_slice(&900u32.to_le_bytes());
        torn.extend_from_slice(&[7; 40]);
        std::os::unix::fs::FileExt::write_all_at(&file, &torn, end as u64).unwrap();
    })
    .await;
    assert!(
        server.logs().contains("torn record"),
        "the cut is logged:\n{}",
        server.logs()
    );
}

#[tokio::test]
async fn a_damaged_log_record_before_the_tail_refuses_the_start_naming_file_and_offset() {
    let mut server = Server::start(Options::default());
    for i in 0..5 {
        let id = format!("7eb1{i:04}-0000-4000-8000-000000000000");
        let event = lox24_event(&id, &phone(i), 1_700_000_000);
        assert_eq!(server.lox24(event).await.status, 200);
    }
    assert!(server.terminate().success());
    let (segment, _) = newest_segment(&server.data_dir);
    // The first record's first payload byte; four intact records follow it.
    flip_byte(&segment, 32 + 24);
    let Err((status, logs)) = server.try_restart() else {
        panic!("a start on a damaged log must be refused");
    };
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{logs}");
    let line = logs
        .lines()
        .find(|l| l.starts_with("suppressd: "))
        .unwrap_or_else(|| panic!("no refusal line:\n{logs}"));
    assert!(line.contains(&segment.display().to_string()), "{line}");
    assert!(line.contains("at byte 32"), "{line}");
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    found.sort();
    found
}

/// Snapshots bound the log: once one is verified, the segments it covers are gone, and a
/// database deleted afterwards is rebuilt from the snapshot and what the log still holds.
#[tokio::test]
async fn a_verified_snapshot_replaces_the_segments_it_covers_and_rebuilds_the_list() {
    let mut server = Server::start(Options {
        extra: vec![
            "--log-segment-mb".into(),
            "1".into(),
            "--snapshot-every-events".into(),
            "50000".into(),
        ],
        ..Options::default()
    });
    let mut all = Vec::new();
    for batch in 0..3 {
        let list: Vec<String> = (0..20_000).map(|i| format!("+4930{batch}{i:07}")).collect();
        let imported = server.import_list(&list).await;
        assert_eq!(imported.status, 200, "{}", imported.text);
        all.extend(list);
    }
    let first_segment = segments(&server.data_dir)[0].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.metric("suppressd_store_snapshots_total").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot:\n{}",
            server.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        !first_segment.exists(),
        "the first segment is covered and removed: {:?}",
        segments(&server.data_dir)
    );
    assert!(server.metric("suppressd_store_snapshot_bytes").await > 0.0);
    let one = format!("/v1/phones/{}", all[0]);
    let before = (
        server.get("/v1/export").await.text,
        server.get(&format!("{one}/history")).await.text,
    );

    // Events after the snapshot are in the log only.
    let late = lox24_event(
        "7eb2ffff-0000-4000-8000-000000000000",
        "+4930777999",
        1_700_000_000,
    );
    assert_eq!(server.lox24(late).await.status, 200);
    assert!(server.terminate().success());
    std::fs::remove_dir_all(server.data_dir.join("db")).unwrap();
    if let Err((status, logs)) = server.try_restart() {
        panic!("refused ({status:?}):\n{logs}");
    }
    assert!(server
        .logs()
        .contains("the snapshot is in the rebuilt database"));
    let late_record = server.get("/v1/phones/+4930777999").await.json();
    assert_eq!(late_record["suppressed"], true);
    for chunk in all.chunks(10_000) {
        let checked = server
            .api("POST", "/v1/check", json!({ "phones": chunk }).to_string())
            .await
            .json();
        for (phone, result) in chunk.iter().zip(checked["results"].as_array().unwrap()) {
            assert_eq!(result["suppressed"], true, "{phone}");
        }
    }
    let export = server.get("/v1/export").await.text;
    let without_late: Vec<&str> = export
        .lines()
        .filter(|l| !l.contains("+4930777999"))
        .collect();
    assert_eq!(without_late, before.0.lines().collect::<Vec<_>>());
    assert_eq!(export.lines().count(), before.0.lines().count() + 1);
    assert_eq!(server.get(&format!("{one}/history")).await.text, before.1);
}
