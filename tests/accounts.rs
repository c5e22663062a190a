//! Account subjects: Tencent Cloud Chat official-account unsubscribes and Sendios SMS events,
//! over real HTTPS against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{now, seed_example, Options, Server, TENCENT_APP};
use serde_json::{json, Value};

const COMMAND: &str = "OfficialAccount.CallbackAfterDeleteSubscriber";
const SCOPE_PATH: &str = "tencent:%40TOA%23_test_OA_for_penn";

/// The Tencent page's sample request with its `//` comments removed.
fn tencent_sample() -> String {
    let sample = seed_example(
        "tests/fixtures/tencent-after-delete-subscriber.txt",
        "{\n    \"CallbackCommand\"",
        "Request fields",
    );
    sample
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The Sendios page's examples (sms_sent, sms_lost, sms_click) with their JSON typos repaired.
fn sendios_samples() -> Vec<Value> {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sendios-sms-events-uk.txt"),
    )
    .unwrap();
    page.split("{  \n  \"0\": {")
        .skip(1)
        .map(|chunk| {
            let inner = &chunk[..chunk.find('}').unwrap()];
            let repaired = inner.replace("\"sms\n", "\"sms\"\n");
            serde_json::from_str::<Value>(&format!("{{\"0\": {{{repaired}}}}}")).unwrap()
        })
        .collect()
}

fn sign(token: &str, time: i64) -> String {
    suppressd::secret::sha256_hex(format!("{token}{time}").as_bytes())
}

/// Delivers the Tencent sample, unsigned, and returns the HTTP status.
async fn deliver_sample(server: &Server) -> u16 {
    server
        .webhook(&tencent_url(COMMAND, None), &[], tencent_sample())
        .await
        .status
}

fn tencent_url(command: &str, signature: Option<(&str, i64)>) -> String {
    let mut url = format!("/webhooks/tencent?SdkAppid={TENCENT_APP}&CallbackCommand={command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI");
    if let Some((token, time)) = signature {
        url.push_str(&format!("&Sign={}&RequestTime={time}", sign(token, time)));
    }
    url
}

#[tokio::test]
async fn tencent_sample_suppresses_each_subscriber_in_its_official_account_scope() {
    let mut server = Server::start(Options {
        tencent: Some(None),
        ..Options::default()
    });
    let reply = server
        .webhook(&tencent_url(COMMAND, None), &[], tencent_sample())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""})
    );

    for account in ["jared", "leckie"] {
        let record = server
            .get(&format!("/v1/accounts/{SCOPE_PATH}/{account}"))
            .await;
        assert_eq!(record.status, 200);
        let record = record.json();
        assert_eq!(record["scope"], "tencent:@TOA#_test_OA_for_penn");
        assert_eq!(record["account"], account);
        assert_eq!(record["suppressed"], true);
        assert_eq!(record["since"], 1_670_574_414);
        assert_eq!(record["reasons"][0]["source"], "tencent");
        assert_eq!(
            record["reasons"][0]["details"]["operator_account"],
            "leckie"
        );
        assert_eq!(record["reasons"][0]["event_time_ms"], 1_670_574_414_123_i64);
    }
    // The same user in another official account is not suppressed.
    let other = server.get("/v1/accounts/tencent:other/jared").await.json();
    assert_eq!(other["suppressed"], false);

    // Redelivery adds no history entry.
    assert_eq!(deliver_sample(&server).await, 200);
    let history = server
        .get(&format!("/v1/accounts/{SCOPE_PATH}/jared/history"))
        .await
        .json();
    assert_eq!(history["events"].as_array().unwrap().len(), 1);
    assert_eq!(history["scope"], "tencent:@TOA#_test_OA_for_penn");

    // Persists across a restart.
    assert!(server.terminate().success());
    server.restart();
    assert_eq!(
        server
            .get(&format!("/v1/accounts/{SCOPE_PATH}/leckie"))
            .await
            .json()["suppressed"],
        true
    );
}

/// A body whose `CallbackCommand` differs from its URL's is 400, whichever of the two names the
/// unsubscribe, and stores nothing.
#[tokio::test]
async fn tencent_commands_that_contradict_each_other_are_400() {
    let server = Server::start(Options {
        tencent: Some(None),
        ..Options::default()
    });
    let other = "OfficialAccount.CallbackAfterAddSubscriber";
    let delete_in_body = server
        .webhook(&tencent_url(other, None), &[], tencent_sample())
        .await;
    let other_in_body = server
        .webhook(
            &tencent_url(COMMAND, None),
            &[],
            tencent_sample().replace(COMMAND, other),
        )
        .await;
    for reply in [delete_in_body, other_in_body] {
        assert_eq!(reply.status, 400, "{}", reply.text);
        let json = reply.json();
        assert_eq!(json["ActionStatus"], "FAIL", "{json}");
        assert!(
            json["ErrorInfo"]
                .as_str()
                .unwrap()
                .contains("contradicts the URL"),
            "{json}"
        );
    }
    let record = server
        .get(&format!("/v1/accounts/{SCOPE_PATH}/jared"))
        .await
        .json();
    assert_eq!(record["suppressed"], false, "nothing stored: {record}");
    // The same body under its own command is accepted.
    assert_eq!(deliver_sample(&server).await, 200);
}

#[tokio::test]
async fn tencent_signature_replay_window_and_sdkappid() {
    let token = "xxxxyyyy";
    let server = Server::start(Options {
        tencent: Some(Some(token)),
        ..Options::default()
    });
    let body = tencent_sample();
    let fresh = now();
    let ok = server
        .webhook(
            &tencent_url(COMMAND, Some((token, fresh))),
            &[],
            body.clone(),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);

    let status_and_shape = |reply: common::Reply| {
        let json = reply.json();
        assert_eq!(json["ActionStatus"], "FAIL", "{json}");
        assert_ne!(json["ErrorCode"], 0);
        assert!(json["ErrorInfo"].as_str().is_some_and(|i| !i.is_empty()));
        reply.status
    };
    // Wrong SdkAppid (and no Sign): 403 before the signature check.
    let wrong_app = "/webhooks/tencent?SdkAppid=1&CallbackCommand=OfficialAccount.CallbackAfterDeleteSubscriber";
    assert_eq!(
        status_and_shape(server.webhook(wrong_app, &[], body.clone()).await),
        403
    );
    let no_app = "/webhooks/tencent?CallbackCommand=OfficialAccount.CallbackAfterDeleteSubscriber";
    assert_eq!(
        status_and_shape(server.webhook(no_app, &[], body.clone()).await),
        403
    );
    // Missing Sign or RequestTime: 401.
    assert_eq!(
        status_and_shape(
            server
                .webhook(&tencent_url(COMMAND, None), &[], body.clone())
                .await
        ),
        401
    );
    let only_time = format!("{}&RequestTime={fresh}", tencent_url(COMMAND, None));
    assert_eq!(
        status_and_shape(server.webhook(&only_time, &[], body.clone()).await),
        401
    );
    // Wrong Sign, or a RequestTime outside the window: 403.
    for signature in [("other", fresh), (token, fresh - 120), (token, fresh + 120)] {
        let url = tencent_url(COMMAND, Some(signature));
        let reply = server.webhook(&url, &[], body.clone()).await;
        assert_eq!(status_and_shape(reply), 403, "{signature:?}");
    }
    // The Sign is compared case-insensitively.
    let upper = format!("/webhooks/tencent?SdkAppid={TENCENT_APP}&CallbackCommand={COMMAND}&Sign={}&RequestTime={fresh}", sign(token, fresh).to_uppercase());
    assert_eq!(server.webhook(&upper, &[], body.clone()).await.status, 200);
    // 405 and 413 in Tencent's shape too.
    assert_eq!(
        status_and_shape(
            server
                .webhook_method("GET", &tencent_url(COMMAND, None), &[], "")
                .await
        ),
        405
    );
    let huge = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(
        status_and_shape(
            server
                .webhook(&tencent_url(COMMAND, Some((token, fresh))), &[], huge)
                .await
        ),
        413
    );
    // A redelivery with a fresh RequestTime is still a duplicate.
    let again = server
        .webhook(&tencent_url(COMMAND, Some((token, now()))), &[], body)
        .await;
    assert_eq!(again.status, 200);
    let history = server
        .get(&format!("/v1/accounts/{SCOPE_PATH}/jared/history"))
        .await
        .json();
    assert_eq!(history["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn tencent_batch_rule_other_commands_and_invalid_bodies() {
    let server = Server::start(Options {
        tencent: Some(None),
        ..Options::default()
    });
    let url = tencent_url(COMMAND, None);
    let body = json!({
        "CallbackCommand": COMMAND, "Official_Account": "oa", "Operator_Account": "op", "EventTime": 1_700_000_000_000_i64,
        "SubscribeAccountList": [{"Subscriber_Account": "a"}, {"Nobody": true}, {"Subscriber_Account": "c"}],
    });
    let reply = server.webhook(&url, &[], body.to_string()).await;
    assert_eq!(reply.status, 200);
    let json = reply.json();
    assert_eq!(json["ActionStatus"], "OK");
    assert_eq!(json["ErrorCode"], 0);
    assert!(
        json["ErrorInfo"]
            .as_str()
            .unwrap()
            .contains("SubscribeAccountList[1]"),
        "{json}"
    );
    assert_eq!(
        server.get("/v1/accounts/tencent:oa/a").await.json()["suppressed"],
        true
    );
    assert_eq!(
        server.get("/v1/accounts/tencent:oa/c").await.json()["suppressed"],
        true
    );
    assert_eq!(
        server
            .metric("suppressd_webhook_skipped_entries_total{source=\"tencent\"")
            .await,
        1.0
    );

    // Another callback command is acknowledged and ignored, whatever its body.
    let other = server
        .webhook(
            &tencent_url("OfficialAccount.CallbackAfterAddSubscriber", None),
            &[],
            "{}",
        )
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.json()["ActionStatus"], "OK");
    assert_eq!(
        server
            .metric("suppressd_webhook_ignored_events_total{source=\"tencent\"")
            .await,
        1.0
    );

    for bad in [
        "not json".to_owned(),
        json!({"CallbackCommand": COMMAND, "Official_Account": "oa", "SubscribeAccountList": [{}]}).to_string(),
        json!({"CallbackCommand": "Something.Else", "Official_Account": "oa", "SubscribeAccountList": [{"Subscriber_Account": "x"}]}).to_string(),
        json!({"CallbackCommand": COMMAND, "SubscribeAccountList": [{"Subscriber_Account": "x"}]}).to_string(),
    ] {
        let reply = server.webhook(&url, &[], bad.clone()).await;
        assert_eq!(reply.status, 400, "{bad}");
        let json = reply.json();
        assert_eq!(json["ActionStatus"], "FAIL");
        assert_ne!(json["ErrorCode"], 0);
        assert!(!json["ErrorInfo"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        server.get("/v1/accounts/tencent:oa/x").await.json()["suppressed"],
        false
    );
}

#[tokio::test]
async fn disabled_providers_are_plain_404() {
    let server = Server::start(Options::default());
    let tencent = server
        .webhook(&tencent_url(COMMAND, None), &[], tencent_sample())
        .await;
    assert_eq!(tencent.status, 404);
    assert!(tencent.json().get("ActionStatus").is_none());
    assert_eq!(server.sendios("{}").await.status, 404);
}

#[tokio::test]
async fn sendios_seed_examples_and_a_batch_of_several_events() {
    let server = Server::start(Options {
        sendios: true,
        ..Options::default()
    });
    let samples = sendios_samples();
    assert_eq!(
        samples.len(),
        3,
        "sms_sent, sms_lost and sms_click examples"
    );
    for sample in &samples {
        let reply = server.sendios(sample.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let history = server
        .get("/v1/accounts/sendios:99/test123/history")
        .await
        .json();
    let kinds: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sms_sent", "sms_lost", "sms_click"]);
    assert_eq!(
        server.get("/v1/accounts/sendios:99/test123").await.json()["suppressed"],
        false
    );

    // Three losses in one keyed batch (with Sendios' sign member) make the account undeliverable.
    let lost = |sms_id: i64, ts: i64| json!({"event": "sms_lost", "client_user_id": "u7", "project_id": "42", "sms_id": sms_id, "ts": ts});
    let batch = json!({"0": lost(1, 1_700_000_001), "1": lost(2, 1_700_000_002), "5": lost(3, 1_700_000_003), "sign": "deadbeef"});
    let reply = server.sendios(batch.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["accepted"], 3);
    assert_eq!(reply.json()["skipped"], json!([]));
    let record = server.get("/v1/accounts/sendios:42/u7").await.json();
    assert_eq!(record["suppressed"], true);
    assert_eq!(record["since"], 1_700_000_003);
    assert_eq!(record["reasons"][0]["kind"], "undeliverable");

    // Redelivering the batch changes nothing.
    let again = server.sendios(batch.to_string()).await;
    assert_eq!(again.json()["duplicates"], 3);
    assert_eq!(
        server
            .get("/v1/accounts/sendios:42/u7/history")
            .await
            .json()["events"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A click lifts undeliverable (as an array batch).
    let click = json!([{"event": "sms_click", "client_user_id": "u7", "project_id": 42, "sms_id": 4, "ts": 1_700_000_010}]);
    assert_eq!(server.sendios(click.to_string()).await.status, 200);
    assert_eq!(
        server.get("/v1/accounts/sendios:42/u7").await.json()["suppressed"],
        false
    );
}

#[tokio::test]
async fn sendios_batch_rule_skips_unusable_entries_and_ignores_unknown_events() {
    let server = Server::start(Options {
        sendios: true,
        extra: vec!["--sendios-lost-threshold".into(), "1".into()],
        ..Options::default()
    });
    let body = json!({
        "0": {"event": "sms_lost", "client_user_id": "a", "project_id": 1, "sms_id": 10},
        "1": {"client_user_id": "b", "project_id": 1},
        "2": {"event": "sms_lost", "project_id": 1},
        "3": {"event": "email_open", "client_user_id": "c", "project_id": 1},
        "sign": "x",
    });
    let reply = server.sendios(body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let json = reply.json();
    let skipped: Vec<&str> = json["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["1", "2"]);
    assert!(json["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("event"));
    assert_eq!(json["ignored"][0]["event"], "email_open");
    assert_eq!(
        server.get("/v1/accounts/sendios:1/a").await.json()["suppressed"],
        true,
        "threshold 1"
    );
    assert_eq!(
        server
            .metric("suppressd_webhook_skipped_entries_total{source=\"sendios\"")
            .await,
        2.0
    );
    assert_eq!(
        server
            .metric("suppressd_webhook_ignored_events_total{source=\"sendios\"")
            .await,
        1.0
    );

    for bad in [
        "{}",
        r#"{"sign": "x"}"#,
        r#"{"0": {"project_id": 1}}"#,
        "[]",
        "nope",
    ] {
        let reply = server.sendios(bad).await;
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.json()["error"].is_string());
    }
    assert_eq!(
        server.webhook("/webhooks/sendios", &[], "{}").await.status,
        401
    );
    assert_eq!(
        server
            .webhook(
                "/webhooks/sendios",
                &[("authorization", "Bearer nope")],
                "{}"
            )
            .await
            .status,
        403
    );
    assert_eq!(
        server
            .webhook(
                "/webhooks/sendios?token=sendios-test-secret",
                &[],
                body.to_string()
            )
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn check_takes_accounts_after_phones() {
    let server = Arc::new(Server::start(Options {
        tencent: Some(None),
        ..Options::default()
    }));
    assert_eq!(deliver_sample(&server).await, 200);
    let body = json!({
        "phones": ["+4930123456"],
        "accounts": [
            {"scope": "tencent:@TOA#_test_OA_for_penn", "account": "jared"},
            {"scope": "tencent:@TOA#_test_OA_for_penn", "account": "nobody"},
            {"scope": "tencent:x"},
        ],
    });
    let reply = server.api("POST", "/v1/check", body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let results = reply.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["phone"], "+4930123456");
    assert_eq!(
        results[1],
        json!({"input": {"scope": "tencent:@TOA#_test_OA_for_penn", "account": "jared"}, "scope": "tencent:@TOA#_test_OA_for_penn",
               "account": "jared", "suppressed": true, "since": 1_670_574_414})
    );
    assert_eq!(results[2]["suppressed"], false);
    assert_eq!(results[3]["input"], json!({"scope": "tencent:x"}));
    assert!(results[3]["error"].is_string());
}
