//! Power-cut safety at the system-call level: under `strace -f`, every 200 to a webhook is
//! written to its socket only after an `fdatasync` of the log segment that holds the event,
//! never on the strength of sled's `sync_file_range` alone.
//!
//! Deliveries are sent one at a time, so every log write and sync between two responses belongs
//! to the second one's commit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{lox24_event, require_tools, Options, Server};

const DELIVERIES: usize = 20;

#[tokio::test]
async fn every_acknowledgement_follows_an_fdatasync_of_the_log() {
    require_tools(
        "every_acknowledgement_follows_an_fdatasync_of_the_log",
        &["strace"],
    );
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let trace = dir.path().join("strace.out");
    let mut server = Server::start_in(
        dir.clone(),
        Options {
            prefix: vec![
                "strace".into(),
                "-f".into(),
                "-qq".into(),
                "-yy".into(),
                "-e".into(),
                "trace=write,writev,sendto,sendmsg,pwrite64,fdatasync,fsync,sync_file_range".into(),
                "-o".into(),
                trace.display().to_string(),
            ],
            ..Options::default()
        },
    );
    let port = server.webhook.port();
    for i in 0..DELIVERIES {
        let id = format!("c0ffee00-0000-4000-8000-{i:012x}");
        let reply = server
            .lox24(lox24_event(&id, &format!("+4916{i:08}"), 1_700_000_000))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    server.kill();

    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Each delivery used its own connection; its response is the last write on that socket.
    let local = format!("127.0.0.1:{port}->");
    let mut last_write_per_connection: Vec<(String, usize)> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let is_socket_write = ["write(", "writev(", "sendto(", "sendmsg("]
            .iter()
            .any(|call| line.contains(call));
        let Some(start) = line.find(&local).filter(|_| is_socket_write) else {
            continue;
        };
        let peer = line[start + local.len()..]
            .split(']')
            .next()
            .unwrap()
            .to_owned();
        match last_write_per_connection
            .iter_mut()
            .find(|(p, _)| *p == peer)
        {
            Some(entry) => entry.1 = index,
            None => last_write_per_connection.push((peer, index)),
        }
    }
    assert_eq!(
        last_write_per_connection.len(),
        DELIVERIES,
        "expected one connection per delivery in the trace"
    );
    let mut responses: Vec<usize> = last_write_per_connection.iter().map(|(_, i)| *i).collect();
    responses.sort_unstable();
    // The first window opens with the first delivery's connection (its TLS handshake), after
    // the log's preallocation at start.
    let first_contact = lines.iter().position(|l| l.contains(&local)).unwrap();

    // strace prints a call that another thread interrupts as "<unfinished ...>" and its end as
    // "<... call resumed>" on a later line; the resumed half names no file, so each line is
    // judged by the call its thread started, and a call counts where it completes.
    let wal = "/data/log/";
    let mut started: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    let calls: Vec<&str> = lines
        .iter()
        .map(|line| {
            let tid = thread_of(line);
            if line.contains("resumed>") {
                started.remove(tid).unwrap_or(line)
            } else {
                if line.contains("<unfinished ...>") {
                    started.insert(tid, call_of(line));
                }
                call_of(line)
            }
        })
        .collect();
    let finished = |index: usize| !lines[index].contains("<unfinished ...>");
    let wal_write = |index: usize| {
        let call = calls[index];
        ["pwrite64(", "write(", "writev("]
            .iter()
            .any(|name| call.starts_with(name))
            && call.contains(wal)
            && finished(index)
    };
    let completed_sync = |index: usize| {
        let call = calls[index];
        call.starts_with("fdatasync(")
            && call.contains(wal)
            && finished(index)
            && lines[index].contains("= 0")
    };
    let mut previous = first_contact;
    for (n, &response) in responses.iter().enumerate() {
        let window = &lines[previous..response];
        let write_at = (previous..response).position(wal_write);
        let sync_at = (previous..response).rposition(completed_sync);
        match (write_at, sync_at) {
            (Some(write), Some(sync)) if write < sync => {}
            _ => panic!(
                "response {n} (trace line {response}) was not preceded by a log write and fdatasync:\n{}",
                window.join("\n")
            ),
        }
        previous = response + 1;
    }
}

/// The thread id `strace -f` puts in front of a line.
fn thread_of(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

/// A line without the thread id `strace -f` puts in front: `1234  fdatasync(…` → `fdatasync(…`.
fn call_of(line: &str) -> &str {
    line.trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start()
}
