//! LOX24 `phone.unsubscribe` intake over real HTTPS against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use common::{lox24_event, lox24_seed, Options, Server, SECRET};
use serde_json::json;

const SEED_ID: &str = "ef58b437-1319-4b0c-961b-17214cf1cf32";

#[tokio::test]
async fn seed_example_verbatim_is_recorded_with_all_details() {
    let server = Server::start(Options::default());
    let reply = server.lox24(lox24_seed()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["status"], "accepted");

    let record = server.get("/v1/phones/%2B4911113333444").await;
    assert_eq!(record.status, 200);
    let record = record.json();
    assert_eq!(record["phone"], "+4911113333444");
    assert_eq!(record["suppressed"], true);
    assert_eq!(record["since"], 1757849748);
    let reason = &record["reasons"][0];
    assert_eq!(reason["source"], "lox24");
    assert_eq!(reason["kind"], "unsubscribe");
    assert_eq!(reason["event_id"], SEED_ID);
    assert_eq!(reason["event_time"], 1757849748);
    assert_eq!(
        reason["details"],
        json!({
            "user_id": 2, "campaign_code": "3KCKb5nMD", "reason_id": 4, "reason_label": "Es ist unverständlich",
            "additional_text": "zusätzlicher Benutzertext mit Erklärung", "short_link_code": "baaIou",
            "unsubscribe_request_id": 59, "api_version": "2022-05-25", "attempt_number": 1, "attempt_total": 4,
        })
    );

    let history = server.get("/v1/phones/+4911113333444/history").await.json();
    assert_eq!(history["phone"], "+4911113333444");
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event_id"], SEED_ID);
    assert_eq!(events[0]["source"], "lox24");
    assert_eq!(events[0]["event_time"], 1757849748);
    assert!(events[0]["receive_time"].as_i64().unwrap() > 1757849748);
}

#[tokio::test]
async fn retries_of_the_same_id_change_nothing() {
    let server = Server::start(Options::default());
    assert_eq!(server.lox24(lox24_seed()).await.status, 200);
    let before = server.get("/v1/phones/+4911113333444").await.json();
    for attempt in 2..=4 {
        let retry = lox24_seed().replace(
            "\"attempt_number\": 1",
            &format!("\"attempt_number\": {attempt}"),
        );
        let reply = server.lox24(retry).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["status"], "duplicate");
    }
    // The id in another case is the same event.
    let upper = lox24_seed().replace(SEED_ID, &SEED_ID.to_uppercase());
    assert_eq!(server.lox24(upper).await.json()["status"], "duplicate");
    assert_eq!(server.get("/v1/phones/+4911113333444").await.json(), before);
    let history = server.get("/v1/phones/+4911113333444/history").await.json();
    assert_eq!(history["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        server
            .metric("suppressd_webhook_requests_total{source=\"lox24\",outcome=\"duplicate\"")
            .await,
        4.0
    );
}

#[tokio::test]
async fn a_new_event_keeps_the_earlier_since_and_adds_history() {
    let server = Server::start(Options::default());
    let first = lox24_event(
        "11111111-1111-4111-8111-111111111111",
        "+4930123456",
        1_700_000_000,
    );
    let second = lox24_event(
        "22222222-2222-4222-8222-222222222222",
        "+49 30 123456",
        1_700_000_500,
    );
    assert_eq!(server.lox24(second).await.status, 200);
    assert_eq!(server.lox24(first).await.status, 200);
    let record = server.get("/v1/phones/+4930123456").await.json();
    assert_eq!(record["since"], 1_700_000_000);
    assert_eq!(record["reasons"].as_array().unwrap().len(), 2);
    let history = server.get("/v1/phones/+4930123456/history").await.json();
    let times: Vec<i64> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_time"].as_i64().unwrap())
        .collect();
    assert_eq!(
        times,
        [1_700_000_000, 1_700_000_500],
        "oldest first by event time"
    );
}

#[tokio::test]
async fn status_codes_in_the_documented_order() {
    let server = Server::start(Options::default());
    let bearer = format!("Bearer {SECRET}");
    let auth = [("authorization", bearer.as_str())];
    let seed = lox24_seed();

    // 404: unknown path, even with a valid credential.
    assert_eq!(
        server
            .webhook("/webhooks/unknown", &auth, seed.clone())
            .await
            .status,
        404
    );
    assert_eq!(server.webhook("/", &auth, seed.clone()).await.status, 404);
    // 405 comes before the credential check.
    let get = server
        .webhook_method("GET", "/webhooks/lox24", &[], "")
        .await;
    assert_eq!(get.status, 405);
    assert_eq!(get.headers["allow"], "POST");
    // 401 without a credential, 403 with a wrong one, in all three forms.
    assert_eq!(
        server
            .webhook("/webhooks/lox24", &[], seed.clone())
            .await
            .status,
        401
    );
    assert_eq!(
        server
            .webhook(
                "/webhooks/lox24",
                &[("authorization", "Bearer nope")],
                seed.clone()
            )
            .await
            .status,
        403
    );
    let wrong_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("lox24:nope")
    );
    assert_eq!(
        server
            .webhook(
                "/webhooks/lox24",
                &[("authorization", &wrong_basic)],
                seed.clone()
            )
            .await
            .status,
        403
    );
    assert_eq!(
        server
            .webhook("/webhooks/lox24?token=nope", &[], seed.clone())
            .await
            .status,
        403
    );
    // 401 before 413: an unauthenticated oversized body is still 401.
    let oversized = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(
        server
            .webhook("/webhooks/lox24", &[], oversized.clone())
            .await
            .status,
        401
    );
    let too_large = server.webhook("/webhooks/lox24", &auth, oversized).await;
    assert_eq!(too_large.status, 413);
    assert!(too_large.json()["error"]
        .as_str()
        .unwrap()
        .contains("1048576"));
    // Exactly 1 MiB is accepted.
    let mut exact = seed.clone().into_bytes();
    exact.resize(1024 * 1024, b' ');
    assert_eq!(
        server.webhook("/webhooks/lox24", &auth, exact).await.status,
        200
    );
    // 413 before 400: an oversized non-JSON body is 413.
    assert_eq!(
        server
            .webhook("/webhooks/lox24", &auth, vec![b'x'; 2 * 1024 * 1024])
            .await
            .status,
        413
    );

    // All three credential forms are accepted.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("lox24:{SECRET}"))
    );
    for (path, headers) in [
        (
            "/webhooks/lox24".to_owned(),
            vec![("authorization", bearer.as_str())],
        ),
        (
            "/webhooks/lox24".to_owned(),
            vec![("authorization", basic.as_str())],
        ),
        (format!("/webhooks/lox24?token={SECRET}"), vec![]),
    ] {
        let reply = server.webhook(&path, &headers, seed.clone()).await;
        assert_eq!(reply.status, 200, "{path} {headers:?}");
    }
}

#[tokio::test]
async fn disabled_source_is_404() {
    let server = Server::start(Options {
        lox24: false,
        ..Options::default()
    });
    let auth = format!("Bearer {SECRET}");
    let reply = server
        .webhook("/webhooks/lox24", &[("authorization", &auth)], lox24_seed())
        .await;
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"].is_string());
}

#[tokio::test]
async fn invalid_bodies_name_the_offending_field() {
    let server = Server::start(Options::default());
    let id = "33333333-3333-4333-8333-333333333333";
    let cases = [
        ("{not json".to_owned(), None),
        ("[1,2]".to_owned(), None),
        (json!({"id": id, "data": {"phone": "+4930123456"}}).to_string(), Some("name")),
        (json!({"name": null, "id": id}).to_string(), Some("name")),
        (json!({"name": 7, "id": id}).to_string(), Some("name")),
        (json!({"name": "phone.unsubscribe", "data": {"phone": "+4930123456"}}).to_string(), Some("id")),
        (json!({"name": "phone.unsubscribe", "id": "not-a-uuid", "data": {"phone": "+4930123456"}}).to_string(), Some("id")),
        (json!({"name": "phone.unsubscribe", "id": id, "data": {}}).to_string(), Some("data.phone")),
        (json!({"name": "phone.unsubscribe", "id": id}).to_string(), Some("data.phone")),
        (json!({"name": "phone.unsubscribe", "id": id, "data": {"phone": "+49 CALL ME"}}).to_string(), Some("data.phone")),
        (json!({"name": "phone.unsubscribe", "id": id, "data": {"phone": "030 123456"}}).to_string(), Some("data.phone")),
    ];
    for (body, field) in cases {
        let reply = server.lox24(body.clone()).await;
        assert_eq!(reply.status, 400, "{body}");
        let error = reply.json();
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
        assert_eq!(error["field"].as_str(), field, "{body}");
    }
    // Nothing was stored by any of them.
    assert_eq!(
        server.get("/v1/phones/+4930123456/history").await.json()["events"],
        json!([])
    );
}

#[tokio::test]
async fn other_event_names_are_acknowledged_ignored_and_counted() {
    let server = Server::start(Options::default());
    let reply = server
        .lox24(json!({"name": "phone.subscribe", "data": "whatever"}).to_string())
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["status"], "ignored");
    assert_eq!(
        server
            .metric("suppressd_webhook_ignored_events_total{source=\"lox24\"")
            .await,
        1.0
    );
}

#[tokio::test]
async fn cosmetic_fields_never_lose_the_opt_out() {
    let server = Server::start(Options::default());
    let body = json!({
        "id": "44444444-4444-4444-8444-444444444444",
        "name": "phone.unsubscribe",
        "attempts_total": "four",
        "unknown_field": {"nested": true},
        "data": {
            "phone": "0043 676 6304011",
            "user_id": "not-an-int",
            "campaign_code": 12,
            "additional_data": {"reason": {"id": "x", "label": 5}},
            "short_link_code": null,
        }
    });
    let reply = server.lox24(body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let record = server.get("/v1/phones/+436766304011").await.json();
    assert_eq!(record["suppressed"], true);
    let details = &record["reasons"][0]["details"];
    for absent in [
        "user_id",
        "campaign_code",
        "reason_id",
        "reason_label",
        "attempt_total",
    ] {
        assert!(
            details.get(absent).is_none(),
            "{absent} should be absent: {details}"
        );
    }
    assert_eq!(details["phone_as_sent"], "0043 676 6304011");
    let logs = server.wait_for_log("stored with fields absent").await;
    assert!(
        logs.contains("WARN") && logs.contains("data.user_id"),
        "{logs}"
    );
}

#[tokio::test]
async fn spellings_of_a_number_are_one_subject() {
    let server = Server::start(Options::default());
    let id = "55555555-5555-4555-8555-555555555555";
    assert_eq!(
        server
            .lox24(lox24_event(id, "+49 (0)30 1234567", 1_700_000_000))
            .await
            .status,
        200
    );
    for path in [
        "/v1/phones/+49301234567",
        "/v1/phones/%2B49301234567",
        "/v1/phones/004930%201234567",
        "/v1/phones/+4930%201234567",
        "/v1/phones/%2B49%20(0)30%201234567",
    ] {
        let record = server.get(path).await;
        assert_eq!(record.status, 200, "{path}");
        assert_eq!(record.json()["phone"], "+49301234567", "{path}");
        assert_eq!(record.json()["suppressed"], true, "{path}");
    }
    let seed_forms = ["004911113333444", "+49 111 13333444", "+4911113333444"];
    assert_eq!(
        server
            .lox24(lox24_event(
                "66666666-6666-4666-8666-666666666666",
                seed_forms[0],
                1
            ))
            .await
            .status,
        200
    );
    for form in seed_forms {
        let retry = lox24_event("66666666-6666-4666-8666-666666666666", form, 1);
        assert_eq!(server.lox24(retry).await.json()["status"], "duplicate");
        let path = format!("/v1/phones/{}", form.replace(' ', "%20"));
        assert_eq!(server.get(&path).await.json()["phone"], "+4911113333444");
    }
}
