//! Export and import against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{lox24_event, now, Options, Server};
use serde_json::json;

fn with_sendios() -> Options {
    Options {
        sendios: true,
        ..Options::default()
    }
}

#[tokio::test]
async fn export_then_import_into_an_empty_store_round_trips_exactly() {
    let source = Server::start(with_sendios());
    for i in 0..30 {
        let id = format!("eeeeeeee-0000-4000-8000-{i:012}");
        assert_eq!(
            source
                .lox24(lox24_event(
                    &id,
                    &format!("+49308880{i:03}"),
                    now() - 100 + i
                ))
                .await
                .status,
            200
        );
    }
    // A lift, then an older unsubscribe that loses to it (kept as not applied).
    assert_eq!(
        source
            .api(
                "DELETE",
                "/v1/phones/+49308880000",
                json!({"note": "consent form 7"}).to_string()
            )
            .await
            .status,
        200
    );
    assert_eq!(
        source
            .lox24(lox24_event(
                "eeeeeeee-0000-4000-8000-999999999999",
                "+49308880000",
                now() - 500
            ))
            .await
            .status,
        200
    );
    // A Sendios lost streak that has not reached the threshold yet: a counter to carry over.
    let lost = |sms: i64| json!({"event": "sms_lost", "client_user_id": "u", "project_id": 9, "sms_id": sms, "ts": 1_700_000_000 + sms});
    assert_eq!(
        source
            .sendios(json!([lost(1), lost(2)]).to_string())
            .await
            .status,
        200
    );
    assert_eq!(
        source
            .api(
                "PUT",
                "/v1/accounts/crm:eu/c1",
                json!({"reason": "hold"}).to_string()
            )
            .await
            .status,
        200
    );

    // A plain list's number: its event's idempotency key is one suppressd minted.
    assert_eq!(
        source
            .api_with(
                "POST",
                "/v1/import",
                &[("content-type", "text/csv")],
                "+49308881000\n".to_string()
            )
            .await
            .status,
        200
    );

    let export = source.get("/v1/export").await;
    assert_eq!(export.status, 200);
    assert_eq!(export.headers["content-type"], "application/x-ndjson");
    assert_eq!(
        export.text.lines().count(),
        33,
        "31 phones, one Sendios account, one manual account"
    );

    let target = Server::start(with_sendios());
    let imported = target
        .api_with(
            "POST",
            "/v1/import",
            &[("content-type", "application/x-ndjson")],
            export.text.clone(),
        )
        .await;
    assert_eq!(imported.status, 200, "{}", imported.text);
    assert_eq!(
        imported.json(),
        json!({"added": 33, "already": 0, "invalid": 0, "invalid_lines": []}),
        "counted by subject, not by event"
    );
    // Each line carries the record its events make, as the API shows it.
    for line in export.text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let subject = &line["subject"];
        let path = match subject.get("phone") {
            Some(phone) => format!("/v1/phones/{}", phone.as_str().unwrap()),
            None => format!(
                "/v1/accounts/{}/{}",
                subject["scope"].as_str().unwrap(),
                subject["account"].as_str().unwrap()
            ),
        };
        let shown = source.get(&path).await.json();
        for field in ["suppressed", "since", "reasons"] {
            assert_eq!(line["record"][field], shown[field], "{path} {field}");
        }
    }

    assert_eq!(
        target.get("/v1/export").await.text,
        export.text,
        "export → import → export is the identity"
    );
    for path in [
        "/v1/phones/+49308880000",
        "/v1/phones/+49308880029",
        "/v1/phones/+49308881000",
        "/v1/accounts/sendios:9/u",
        "/v1/accounts/crm:eu/c1",
    ] {
        assert_eq!(
            target.get(path).await.json(),
            source.get(path).await.json(),
            "{path}"
        );
        let history = format!("{path}/history");
        assert_eq!(
            target.get(&history).await.json(),
            source.get(&history).await.json(),
            "{history}"
        );
    }
    // The lost streak came along: one more loss crosses the threshold of 3.
    assert_eq!(
        target.sendios(json!([lost(3)]).to_string()).await.status,
        200
    );
    assert_eq!(
        target.get("/v1/accounts/sendios:9/u").await.json()["suppressed"],
        true
    );

    // Importing the same export again changes nothing, nor does a line repeated within it.
    let first_line = export.text.lines().next().unwrap().to_string();
    let before = target.get("/v1/export").await.text;
    let again = target
        .api_with(
            "POST",
            "/v1/import",
            &[("content-type", "application/x-ndjson")],
            format!("{}{first_line}\n", export.text),
        )
        .await;
    assert_eq!(
        again.json(),
        json!({"added": 0, "already": 34, "invalid": 0, "invalid_lines": []}),
        "33 subjects and the repeated line, each counted once"
    );
    assert!(
        target.get("/v1/export").await.text == before,
        "nothing was added by importing it again"
    );
}

#[tokio::test]
async fn plain_lists_import_as_unsubscribes_with_source_import() {
    let server = Server::start(Options::default());
    assert_eq!(
        server
            .lox24(lox24_event(
                "ffffffff-0000-4000-8000-000000000001",
                "+4930999001",
                now()
            ))
            .await
            .status,
        200
    );
    let csv = "phone,name\n+4930999001,already\n+4930999002,new\n\n0049 30 999003,\"spaced\"\nnot-a-number,x\n+4930999002,repeat\n";
    let reply = server
        .api_with("POST", "/v1/import", &[("content-type", "text/csv")], csv)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let report = reply.json();
    assert_eq!(
        (&report["added"], &report["already"], &report["invalid"]),
        (&json!(2), &json!(1), &json!(1)),
        "{report}"
    );
    assert_eq!(report["invalid_lines"][0]["line"], 6, "{report}");
    assert!(
        report["invalid_lines"][0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "each invalid line says what was wrong: {report}"
    );
    let record = server.get("/v1/phones/+4930999003").await.json();
    assert_eq!(record["suppressed"], true);
    assert_eq!(record["reasons"][0]["source"], "import");
    // An imported opt-out is the person's own: lifting it needs a note.
    assert_eq!(
        server
            .api("DELETE", "/v1/phones/+4930999003", "")
            .await
            .status,
        400
    );

    let text = server
        .api_with(
            "POST",
            "/v1/import",
            &[("content-type", "text/plain")],
            "+4930999004\r\n+4930999002\r\n",
        )
        .await;
    assert_eq!(
        text.json(),
        json!({"added": 1, "already": 1, "invalid": 0, "invalid_lines": []})
    );
    // Only CSV has a header row: a plain list whose first line is not a number says so.
    let headed = server
        .api_with(
            "POST",
            "/v1/import",
            &[("content-type", "text/plain")],
            "phone\n+4930999005\n",
        )
        .await;
    let report = headed.json();
    assert_eq!(report["added"], 1, "{report}");
    assert_eq!(report["invalid"], 1, "{report}");
    assert_eq!(report["invalid_lines"][0]["line"], 1, "{report}");
    // An NDJSON line whose events are about another subject is refused whole.
    let line = server
        .get("/v1/export")
        .await
        .text
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let mut line: serde_json::Value = serde_json::from_str(&line).unwrap();
    line["subject"] = json!({"phone": "+4930999999"});
    let mismatched = server
        .api_with(
            "POST",
            "/v1/import",
            &[("content-type", "application/x-ndjson")],
            line.to_string(),
        )
        .await;
    assert_eq!(
        mismatched.json()["invalid_lines"][0]["line"],
        1,
        "{}",
        mismatched.text
    );
    assert_eq!(
        server.get("/v1/phones/+4930999999").await.json()["suppressed"],
        false
    );
    let wrong_type = server
        .api_with(
            "POST",
            "/v1/import",
            &[("content-type", "application/json")],
            "[]",
        )
        .await;
    assert_eq!(wrong_type.status, 415);
    assert_eq!(wrong_type.json()["field"], "content-type");
    let message = wrong_type.json()["error"].as_str().unwrap().to_owned();
    assert!(
        message.ends_with("not application/json") && !message.contains("Some("),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_export_and_import() {
    let source = Server::start(Options::default());
    for i in 0..5 {
        let id = format!("abababab-0000-4000-8000-{i:012}");
        assert_eq!(
            source
                .lox24(lox24_event(&id, &format!("+49307770{i:03}"), now()))
                .await
                .status,
            200
        );
    }
    let run = |server: &Server, args: &[&str]| {
        std::process::Command::new(common::binary())
            .arg("--api")
            .arg(format!("http://{}", server.api))
            .args(args)
            .output()
            .unwrap()
    };
    let exported = run(&source, &["export"]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert_eq!(
        exported.stdout,
        source.get("/v1/export").await.text.into_bytes()
    );

    let file = source.dir.path().join("backup.ndjson");
    std::fs::write(&file, &exported.stdout).unwrap();
    let target = Server::start(Options::default());
    let imported = run(&target, &["import", file.to_str().unwrap()]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&imported.stdout).trim(),
        "added 5, already suppressed 0, invalid 0"
    );
    assert_eq!(
        target.get("/v1/export").await.text.into_bytes(),
        exported.stdout
    );

    let list = source.dir.path().join("optouts.csv");
    std::fs::write(&list, "number\n+49307770000\n+49307770999\nnope\n").unwrap();
    let imported = run(&target, &["--json", "import", list.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&imported.stdout).unwrap();
    assert_eq!(
        report,
        json!({"added": 1, "already": 1, "invalid": 1, "invalid_lines": [
            {"line": 4, "error": report["invalid_lines"][0]["error"]}
        ]})
    );
    let imported = run(&target, &["import", list.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&imported.stdout);
    assert!(
        said.trim()
            .starts_with("added 0, already suppressed 2, invalid 1 (line 4: "),
        "{said}"
    );
    let missing = run(&target, &["import", "/nonexistent.csv"]);
    assert_eq!(missing.status.code(), Some(2));
}
