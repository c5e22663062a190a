//! The local lookup API against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{lox24_event, lox24_seed, Options, Server};
use serde_json::json;

#[tokio::test]
async fn unknown_numbers_are_not_suppressed_and_bad_numbers_are_400() {
    let server = Server::start(Options::default());
    let record = server.get("/v1/phones/+4930999999").await;
    assert_eq!(record.status, 200);
    assert_eq!(
        record.json(),
        json!({"phone": "+4930999999", "suppressed": false, "since": null, "reasons": []})
    );
    let history = server.get("/v1/phones/+4930999999/history").await;
    assert_eq!(
        history.json(),
        json!({"phone": "+4930999999", "events": []})
    );

    for bad in ["not-a-number", "030123456", "+49", "+0123456789"] {
        let reply = server.get(&format!("/v1/phones/{bad}")).await;
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.json()["error"].is_string(), "{bad}");
        assert_eq!(
            server
                .get(&format!("/v1/phones/{bad}/history"))
                .await
                .status,
            400,
            "{bad}"
        );
    }
    assert_eq!(server.get("/v1/nothing").await.status, 404);
    assert_eq!(
        server
            .api("POST", "/v1/phones/+4930999999", "")
            .await
            .status,
        405
    );
    assert_eq!(server.get("/v1/check").await.status, 405);
}

#[tokio::test]
async fn default_region_reads_national_numbers() {
    let server = Server::start(Options {
        extra: vec!["--default-region".into(), "DE".into()],
        ..Options::default()
    });
    let id = "77777777-7777-4777-8777-777777777777";
    assert_eq!(
        server
            .lox24(lox24_event(id, "030 1234567", 1_700_000_000))
            .await
            .status,
        200
    );
    let record = server.get("/v1/phones/+49301234567").await.json();
    assert_eq!(record["suppressed"], true);
    assert_eq!(
        server.get("/v1/phones/030%201234567").await.json()["phone"],
        "+49301234567"
    );
}

#[tokio::test]
async fn bulk_check_answers_in_input_order_with_per_entry_errors() {
    let server = Server::start(Options::default());
    assert_eq!(server.lox24(lox24_seed()).await.status, 200);
    let body =
        json!({"phones": ["004911113333444", "+4930999999", "letters", 42, "+49 111 13333444"]});
    let reply = server.api("POST", "/v1/check", body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let results = reply.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 5);
    assert_eq!(
        results[0],
        json!({"input": "004911113333444", "phone": "+4911113333444", "suppressed": true, "since": 1757849748})
    );
    assert_eq!(
        results[1],
        json!({"input": "+4930999999", "phone": "+4930999999", "suppressed": false, "since": null})
    );
    assert_eq!(results[2]["input"], "letters");
    assert!(results[2]["error"].is_string());
    assert_eq!(results[3]["input"], 42);
    assert!(results[3]["error"].is_string());
    assert_eq!(results[4]["phone"], "+4911113333444");
    assert_eq!(results[4]["suppressed"], true);

    let empty = server.api("POST", "/v1/check", r#"{"phones": []}"#).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json(), json!({"results": []}));

    let limit: Vec<String> = (0..10_000).map(|i| format!("+4930{i:07}")).collect();
    let at_limit = server
        .api("POST", "/v1/check", json!({ "phones": limit }).to_string())
        .await;
    assert_eq!(at_limit.status, 200);
    assert_eq!(at_limit.json()["results"].as_array().unwrap().len(), 10_000);
    let over: Vec<String> = (0..10_001).map(|i| format!("+4930{i:07}")).collect();
    let too_many = server
        .api("POST", "/v1/check", json!({ "phones": over }).to_string())
        .await;
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.json()["field"], "phones");

    let not_json = server.api("POST", "/v1/check", "phones").await;
    assert_eq!(not_json.status, 400);
    assert!(not_json.json()["error"].is_string());
}

/// A mistyped bulk check must not read as "nothing suppressed": a script would send to all.
#[tokio::test]
async fn a_bulk_check_without_a_list_or_with_an_unknown_member_is_400() {
    let server = Server::start(Options::default());
    for (body, field) in [
        (r#"{"phone": ["+4915112345678"]}"#, "phone"),
        (r#"{"phons": ["+4915112345678"]}"#, "phons"),
        (
            r#"{"phones": ["+4915112345678"], "acounts": []}"#,
            "acounts",
        ),
        ("{}", "phones"),
        ("  { }  ", "phones"),
        (
            r#"{"phones": ["+4915112345678"], "accounts": null}"#,
            "accounts",
        ),
        (r#"{"phones": "+4915112345678"}"#, "phones"),
    ] {
        let reply = server.api("POST", "/v1/check", body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text);
        let error = reply.json();
        assert_eq!(error["field"], field, "{body}: {error}");
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
        assert!(error.get("results").is_none(), "{body}: {error}");
    }
    for body in [
        r#"{"phones": []}"#,
        r#"{"accounts": []}"#,
        r#"{"phones": [], "accounts": []}"#,
    ] {
        let reply = server.api("POST", "/v1/check", body).await;
        assert_eq!(reply.status, 200, "{body}: {}", reply.text);
        assert_eq!(reply.json(), json!({"results": []}), "{body}");
    }
}

#[tokio::test]
async fn api_tokens_guard_v1_but_not_health_or_metrics() {
    let server = Server::start(Options {
        api_tokens: Some("ops:first-token\nsecond-token\n".into()),
        ..Options::default()
    });
    assert_eq!(
        server
            .api_with("GET", "/v1/phones/+4930999999", &[], "")
            .await
            .status,
        401
    );
    let wrong = server
        .api_with(
            "GET",
            "/v1/phones/+4930999999",
            &[("authorization", "Bearer nope")],
            "",
        )
        .await;
    assert_eq!(wrong.status, 403);
    assert!(wrong.json()["error"].is_string());
    for token in ["first-token", "second-token"] {
        let auth = format!("Bearer {token}");
        let ok = server
            .api_with(
                "GET",
                "/v1/phones/+4930999999",
                &[("authorization", &auth)],
                "",
            )
            .await;
        assert_eq!(ok.status, 200, "{token}");
    }
    assert_eq!(
        server
            .api_with("POST", "/v1/check", &[], r#"{"phones":[]}"#)
            .await
            .status,
        401
    );
    assert_eq!(
        server.api_with("GET", "/healthz", &[], "").await.status,
        200
    );
    assert_eq!(
        server.api_with("GET", "/metrics", &[], "").await.status,
        200
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let server = Server::start(Options::default());
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    assert_eq!(server.lox24(lox24_seed()).await.status, 200);
    server.get("/v1/phones/+4911113333444").await;
    assert_eq!(
        server.metric("suppressd_webhook_requests_total{source=\"lox24\",outcome=\"accepted\",status=\"200\"}").await,
        1.0
    );
    assert!(
        server
            .metric("suppressd_lookups_total{mode=\"single\"}")
            .await
            >= 1.0
    );
    assert!(server.metric("suppressd_store_size_bytes").await > 0.0);
    assert!(
        server
            .metric("suppressd_store_flush_duration_seconds_count")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn streamed_bulk_check_of_a_million_lines_answers_every_line_in_order() {
    let server = Server::start(Options::default());
    assert_eq!(
        server
            .lox24(lox24_event(
                "cccccccc-0000-4000-8000-000000000001",
                "+4917000500000",
                1_700_000_000
            ))
            .await
            .status,
        200
    );
    let mut input = String::with_capacity(16 * 1_000_000);
    for i in 0..1_000_000 {
        input.push_str(&format!("+4917000{i:06}\n"));
    }
    input.push_str("\nnot a number\r\n");
    let reply = server
        .api_with(
            "POST",
            "/v1/check",
            &[("content-type", "text/plain")],
            input,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/x-ndjson");
    let lines: Vec<&str> = reply.text.lines().collect();
    assert_eq!(lines.len(), 1_000_001, "one result per non-blank line");
    for i in [0usize, 1, 499_999, 500_000, 999_999] {
        let result: serde_json::Value = serde_json::from_str(lines[i]).unwrap();
        assert_eq!(result["input"], format!("+4917000{i:06}"), "order");
        assert_eq!(result["suppressed"], i == 500_000, "{i}");
    }
    let last: serde_json::Value = serde_json::from_str(lines[1_000_000]).unwrap();
    assert_eq!(last["input"], "not a number");
    assert!(last["error"].is_string());
}

#[tokio::test]
async fn streamed_bulk_check_in_ndjson_takes_phones_and_accounts() {
    let server = Server::start(Options::default());
    assert_eq!(server.lox24(lox24_seed()).await.status, 200);
    let input = "\"004911113333444\"\n{\"phone\": \"+4930999999\"}\n{\"scope\": \"crm\", \"account\": \"x\"}\n[1]\n{oops\n";
    let reply = server
        .api_with(
            "POST",
            "/v1/check",
            &[("content-type", "application/x-ndjson")],
            input,
        )
        .await;
    assert_eq!(reply.status, 200);
    let results: Vec<serde_json::Value> = reply
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 5);
    assert_eq!(
        results[0],
        json!({"input": "004911113333444", "phone": "+4911113333444", "suppressed": true, "since": 1757849748})
    );
    assert_eq!(results[1]["input"], json!({"phone": "+4930999999"}));
    assert_eq!(results[1]["suppressed"], false);
    assert_eq!(
        results[2],
        json!({"input": {"scope": "crm", "account": "x"}, "scope": "crm", "account": "x", "suppressed": false, "since": null})
    );
    assert!(results[3]["error"].is_string());
    assert_eq!(results[4]["input"], "{oops");
    assert!(results[4]["error"].is_string());
}

/// A lookup's answer is kept in memory whether or not the number is suppressed: a number
/// checked (and found free) before its unsubscribe must be suppressed from the unsubscribe's 200
/// on, and free again once lifted.
#[tokio::test]
async fn a_number_looked_up_before_its_unsubscribe_is_suppressed_from_its_200_on() {
    let server = Server::start(Options::default());
    for _ in 0..3 {
        let record = server.get("/v1/phones/%2B4930555000222").await.json();
        assert_eq!(record["suppressed"], false, "{record}");
    }
    let reply = server
        .lox24(lox24_event(
            "8d7f0c4e-0000-4000-8000-00000000c0df",
            "+4930555000222",
            1_700_000_000,
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for _ in 0..3 {
        let record = server.get("/v1/phones/%2B4930555000222").await.json();
        assert_eq!(record["suppressed"], true, "{record}");
        assert_eq!(record["reasons"][0]["source"], "lox24", "{record}");
    }
    let reply = server
        .api(
            "DELETE",
            "/v1/phones/%2B4930555000222",
            r#"{"note": "asked to be messaged again"}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let record = server.get("/v1/phones/%2B4930555000222").await.json();
    assert_eq!(record["suppressed"], false, "{record}");
    assert_eq!(record["reasons"], json!([]), "{record}");
}

/// A suppressed number looked up is kept in memory for the next lookup; a new event for it
/// must show at once, so the write evicts it.
#[tokio::test]
async fn a_lookup_after_a_new_event_shows_it_though_the_record_was_cached() {
    let server = Server::start(Options::default());
    let reply = server
        .api(
            "PUT",
            "/v1/phones/%2B4930555000111",
            r#"{"reason": "legal hold"}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for _ in 0..3 {
        let record = server.get("/v1/phones/%2B4930555000111").await.json();
        assert_eq!(record["reasons"].as_array().unwrap().len(), 1, "{record}");
    }
    let reply = server
        .lox24(lox24_event(
            "8d7f0c4e-0000-4000-8000-00000000c0de",
            "+4930555000111",
            1_700_000_000,
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let record = server.get("/v1/phones/%2B4930555000111").await.json();
    let sources: Vec<&str> = record["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert!(
        sources.contains(&"lox24") && sources.contains(&"manual"),
        "{record}"
    );
}
