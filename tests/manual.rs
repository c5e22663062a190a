//! Manual changes through the API and the event-time ordering rule.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{lox24_event, now, Options, Server};
use serde_json::json;

#[tokio::test]
async fn unsubscribe_delete_late_retry_newer_unsubscribe() {
    let server = Server::start(Options {
        api_tokens: Some("alice:t0ken\n".into()),
        ..Options::default()
    });
    let phone = "+4930555000";
    let path = format!("/v1/phones/{phone}");
    let first = lox24_event("aaaaaaaa-0000-4000-8000-000000000001", phone, now() - 3600);
    assert_eq!(server.lox24(first.clone()).await.status, 200);
    assert_eq!(server.get(&path).await.json()["suppressed"], true);

    // The person's own opt-out needs evidence to be lifted.
    let refused = server.api("DELETE", &path, "").await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["field"], "note");
    assert_eq!(server.get(&path).await.json()["suppressed"], true);

    let lifted = server
        .api(
            "DELETE",
            &path,
            json!({"note": "opted back in by SMS on 2026-11-20"}).to_string(),
        )
        .await;
    assert_eq!(lifted.status, 200, "{}", lifted.text);
    assert_eq!(lifted.json()["suppressed"], false);

    // A late retry, and a different event that happened before the lift: not re-suppressed.
    assert_eq!(server.lox24(first).await.json()["status"], "duplicate");
    let older = lox24_event("aaaaaaaa-0000-4000-8000-000000000002", phone, now() - 1800);
    assert_eq!(server.lox24(older).await.status, 200);
    assert_eq!(server.get(&path).await.json()["suppressed"], false);

    // A genuinely new unsubscribe after the lift suppresses again.
    let newer = lox24_event("aaaaaaaa-0000-4000-8000-000000000003", phone, now() + 60);
    assert_eq!(server.lox24(newer).await.status, 200);
    assert_eq!(server.get(&path).await.json()["suppressed"], true);

    let history = server.get(&format!("{path}/history")).await.json();
    let events = history["events"].as_array().unwrap();
    let summary: Vec<(&str, bool)> = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["applied"].as_bool().unwrap()))
        .collect();
    // In event-time order, as the rules take them (the same on every node, however the events
    // arrived): the late unsubscribe happened before the lift, so it counted until the lift
    // ended it along with the first.
    assert_eq!(
        summary,
        [
            ("unsubscribe", true),
            ("unsubscribe", true),
            ("lift", true),
            ("unsubscribe", true)
        ],
    );
    let times: Vec<i64> = events
        .iter()
        .map(|e| e["event_time_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{times:?}");
    let lift = events.iter().find(|e| e["kind"] == "lift").unwrap();
    assert_eq!(lift["source"], "manual");
    assert_eq!(lift["details"]["actor"], "alice");
    assert_eq!(
        lift["details"]["note"],
        "opted back in by SMS on 2026-11-20"
    );
}

#[tokio::test]
async fn manual_suppressions_and_their_lifts() {
    let server = Server::start(Options::default());
    let path = "/v1/accounts/crm:eu/customer-17";
    let put = server
        .api("PUT", path, json!({"reason": "legal hold"}).to_string())
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    let record = put.json();
    assert_eq!(record["suppressed"], true);
    assert_eq!(record["scope"], "crm:eu");
    assert_eq!(record["reasons"][0]["source"], "manual");
    assert_eq!(record["reasons"][0]["kind"], "suppress");
    assert_eq!(
        record["reasons"][0]["details"],
        json!({"actor": "api", "reason": "legal hold"})
    );

    // Only manual reasons: no note needed.
    let deleted = server.api("DELETE", path, "").await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["suppressed"], false);

    // Lifting what is not suppressed changes nothing.
    let again = server.api("DELETE", "/v1/phones/+4930555111", "").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["suppressed"], false);
    assert_eq!(
        server.get("/v1/phones/+4930555111/history").await.json()["events"],
        json!([])
    );

    let put_phone = server.api("PUT", "/v1/phones/0049%2030%20555111", "").await;
    assert_eq!(put_phone.json()["phone"], "+4930555111");
    assert_eq!(put_phone.json()["suppressed"], true);

    let wrong = server.api("POST", path, "").await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.headers["allow"], "GET, PUT, DELETE");
    assert_eq!(server.api("PUT", path, "{not json").await.status, 400);
    // serde would read `[reason, note]` as the struct; the API takes objects only, and an
    // array changes nothing.
    let array = server
        .api("PUT", "/v1/phones/+4930555222", "[null, null]")
        .await;
    assert_eq!(array.status, 400, "{}", array.text);
    assert!(array.json()["error"]
        .as_str()
        .unwrap()
        .contains("not a JSON object"));
    assert_eq!(
        server.get("/v1/phones/+4930555222").await.json()["suppressed"],
        false
    );
    assert_eq!(server.api("POST", "/v1/check", "[]").await.status, 400);
}

/// A person's unsubscribe and an operator's lift without a note race for the same number, which
/// only an operator's suppression held before. Whichever the store takes first, the number ends
/// suppressed: a lift planned after the unsubscribe is refused, and an unsubscribe after a lift
/// without a note counts, however old its event time, since no consent covered it.
#[tokio::test]
async fn a_concurrent_unsubscribe_is_never_lifted_without_a_note() {
    let server = Server::start(Options::default());
    let mut refused = 0;
    for round in 0..40u32 {
        let phone = format!("+4930777{round:04}");
        let path = format!("/v1/phones/{phone}");
        assert_eq!(server.api("PUT", &path, "").await.status, 200);
        let unsubscribe = lox24_event(
            &format!("bbbbbbbb-0000-4000-8000-{round:012}"),
            &phone,
            now() - 5,
        );
        let (delivered, lift) =
            tokio::join!(server.lox24(unsubscribe), server.api("DELETE", &path, ""));
        assert_eq!(delivered.status, 200, "{}", delivered.text);
        match lift.status {
            200 => {}
            400 => {
                assert_eq!(lift.json()["field"], "note", "{}", lift.text);
                refused += 1;
            }
            other => panic!("lift answered {other}: {}", lift.text),
        }
        let record = server.get(&path).await.json();
        assert_eq!(record["suppressed"], true, "round {round}: {record}");
        assert!(
            record["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["kind"] == "unsubscribe"),
            "round {round}: {record}"
        );
    }
    eprintln!("{refused} of 40 lifts came after the unsubscribe and were refused");
}

/// The `suppressd_suppressed_subjects` gauges: (phones, accounts).
async fn suppressed_counts(server: &Server) -> (f64, f64) {
    let phones = server
        .metric("suppressd_suppressed_subjects{type=\"phone\"}")
        .await;
    let accounts = server
        .metric("suppressd_suppressed_subjects{type=\"account\"}")
        .await;
    (phones, accounts)
}

#[tokio::test]
async fn suppressions_are_listed_in_stable_pages() {
    let mut server = Server::start(Options {
        sendios: true,
        ..Options::default()
    });
    for i in 0..25 {
        let id = format!("bbbbbbbb-0000-4000-8000-{i:012}");
        assert_eq!(
            server
                .lox24(lox24_event(&id, &format!("+49306660{i:03}"), 1_700_000_000))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        server.api("PUT", "/v1/accounts/crm:eu/c1", "").await.status,
        200
    );
    assert_eq!(
        server.api("PUT", "/v1/accounts/crm:eu/c2", "").await.status,
        200
    );
    assert_eq!(
        server
            .api("DELETE", "/v1/accounts/crm:eu/c2", "")
            .await
            .status,
        200
    );
    let sent =
        json!({"event": "sms_sent", "client_user_id": "quiet", "project_id": 3, "sms_id": 1});
    assert_eq!(server.sendios(sent.to_string()).await.status, 200);

    assert_eq!(suppressed_counts(&server).await, (25.0, 1.0));

    // Paging through phones, 10 at a time, visits each exactly once in a stable order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/suppressions?type=phone&suppressed=true&limit=10&cursor={c}"),
            None => "/v1/suppressions?type=phone&suppressed=true&limit=10".to_owned(),
        };
        let page = server.get(&path).await.json();
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["suppressed"], true);
            seen.push(item["phone"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen.len(), 25);
    assert_eq!(sorted, seen);

    let accounts = server.get("/v1/suppressions?type=account").await.json();
    let names: Vec<&str> = accounts["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["account"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["c1", "c2"],
        "without suppressed=, every record (the sms_sent-only account has no record change)"
    );
    let lifted = server.get("/v1/suppressions?suppressed=false").await.json();
    assert_eq!(lifted["items"].as_array().unwrap().len(), 1);
    assert_eq!(lifted["items"][0]["account"], "c2");
    assert_eq!(lifted["next_cursor"], json!(null));
    let future = server
        .get(&format!("/v1/suppressions?since={}", now() + 3600))
        .await
        .json();
    assert_eq!(future["items"], json!([]));
    assert_eq!(
        server.get("/v1/suppressions").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        27
    );

    for bad in [
        "limit=10001",
        "limit=0",
        "type=email",
        "suppressed=maybe",
        "since=soon",
        "cursor=zz",
    ] {
        let reply = server.get(&format!("/v1/suppressions?{bad}")).await;
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.json()["field"].is_string(), "{bad}");
    }
    assert_eq!(server.get("/v1/suppressions?limit=10000").await.status, 200);

    // The counts are rebuilt from the database at start.
    assert!(server.terminate().success());
    server.restart();
    assert_eq!(suppressed_counts(&server).await, (25.0, 1.0));
}

/// Runs a client command against `server` and returns (exit code, stdout, stderr).
fn cli(server: &Server, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(common::binary())
        .arg("--api")
        .arg(format!("http://{}", server.api))
        .args(args)
        .env(
            "SUPPRESSD_API_TOKEN_FILE",
            server.dir.path().join("api.tokens"),
        )
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_check_add_remove_with_exit_codes() {
    let server = Server::start(Options {
        api_tokens: Some("ops:cli-token\n".into()),
        ..Options::default()
    });
    let (code, out, _) = cli(&server, &["check", "+49 30 777000"]);
    assert_eq!((code, out.trim()), (0, "+4930777000: not suppressed"));

    let (code, out, err) = cli(&server, &["add", "+4930777000", "--reason", "complaint"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("suppressed since"), "{out}");
    let (code, out, _) = cli(&server, &["check", "+4930777000"]);
    assert_eq!(code, 1, "suppressed: not safe to send");
    assert!(out.contains("manual suppress"), "{out}");
    let (code, out, _) = cli(&server, &["--json", "check", "+4930777000"]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["reasons"][0]["details"]["actor"], "ops");

    // Every global flag is also read from its SUPPRESSD_<FLAG_NAME> variable; the API's URL
    // from SUPPRESSD_API_URL, or from SUPPRESSD_API when that is unset.
    let older_name = std::process::Command::new(common::binary())
        .args(["check", "+4930777000"])
        .env_remove("SUPPRESSD_API_URL")
        .env("SUPPRESSD_API", format!("http://{}", server.api))
        .env(
            "SUPPRESSD_API_TOKEN_FILE",
            server.dir.path().join("api.tokens"),
        )
        .output()
        .unwrap();
    assert_eq!(
        older_name.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&older_name.stderr)
    );
    let from_env = std::process::Command::new(common::binary())
        .args(["check", "+4930777000"])
        .env("SUPPRESSD_API", "http://127.0.0.1:9")
        .env("SUPPRESSD_API_URL", format!("http://{}", server.api))
        .env("SUPPRESSD_JSON", "true")
        .env(
            "SUPPRESSD_API_TOKEN_FILE",
            server.dir.path().join("api.tokens"),
        )
        .output()
        .unwrap();
    assert_eq!(from_env.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&from_env.stdout).unwrap();
    assert_eq!(json["phone"], "+4930777000");

    assert_eq!(
        server
            .lox24(lox24_event(
                "dddddddd-0000-4000-8000-000000000001",
                "+4930777001",
                now() - 10
            ))
            .await
            .status,
        200
    );
    let (code, _, err) = cli(&server, &["remove", "+4930777001"]);
    assert_eq!(code, 2, "a person's opt-out needs a note");
    assert!(err.contains("note"), "{err}");
    let (code, out, _) = cli(
        &server,
        &[
            "remove",
            "+4930777001",
            "--note",
            "renewed consent by form 12",
        ],
    );
    assert_eq!((code, out.trim()), (0, "+4930777001: not suppressed"));

    let (code, out, _) = cli(&server, &["add", "crm:eu/customer/9"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("crm:eu/customer/9: suppressed"), "{out}");
    assert_eq!(
        server.get("/v1/accounts/crm:eu/customer%2F9").await.json()["suppressed"],
        true
    );

    let (code, _, err) = cli(&server, &["check", "not a phone"]);
    assert_eq!(code, 2);
    assert!(err.contains("400"), "{err}");
    let unreachable = std::process::Command::new(common::binary())
        .args(["--api", "http://127.0.0.1:1", "check", "+4930777000"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(2));
}
