//! `docs/openapi.yaml` against the real server: the methods each documented path answers are
//! exactly the documented ones, and schemathesis, generating a bounded number of cases from the
//! document (fixed seed), finds no 5xx and no response the document does not allow.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::{Options, Server, SECRET, SENDIOS_SECRET};

const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
const SCHEMATHESIS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis");
const API_TOKEN: &str = "openapi-test-token";

/// Every documented path with its methods, read off the document's layout: paths are the keys
/// indented by two spaces under `paths:`, operations the HTTP methods indented by four.
fn documented_operations() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(DOCUMENT).unwrap();
    let mut operations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = None;
    let mut in_paths = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(path) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            current = Some(format!("/{path}"));
            operations.entry(format!("/{path}")).or_default();
        } else if let (Some(path), Some(method)) = (
            &current,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method) {
                operations
                    .get_mut(path)
                    .unwrap()
                    .insert(method.to_uppercase());
            }
        }
    }
    operations
}

fn start() -> Server {
    Server::start(Options {
        api_tokens: Some(format!("{API_TOKEN}\n")),
        tencent: Some(None),
        sendios: true,
        ..Options::default()
    })
}

#[tokio::test]
async fn every_documented_path_answers_exactly_the_documented_methods() {
    let operations = documented_operations();
    assert!(operations.len() >= 13, "document not read: {operations:?}");
    let server = start();
    for (template, methods) in &operations {
        let path = template
            .replace("{phone}", "%2B4911113333444")
            .replace("{scope}", "sendios:1")
            .replace("{account}", "42");
        // Every path refuses a method it does not take with 405 and names the ones it does.
        let reply = if path.starts_with("/webhooks/") {
            server.webhook_method("PATCH", &path, &[], "").await
        } else {
            server.api("PATCH", &path, "").await
        };
        assert_eq!(reply.status, 405, "PATCH {path}: {}", reply.text);
        let allow = reply.headers["allow"].to_str().unwrap();
        let served: BTreeSet<String> = allow.split(", ").map(str::to_owned).collect();
        assert_eq!(
            &served, methods,
            "{template}: served {allow}, documented {methods:?}"
        );
    }
    // And an undocumented path is not served.
    assert_eq!(server.get("/v1/undocumented").await.status, 404);
}

/// Runs schemathesis on the operations whose path matches `paths` and fails with its report.
fn schemathesis(paths: &str, url: &str, extra: &[&str]) {
    // schemathesis writes a cache of what it found into its working directory; keep that out
    // of the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let output = Command::new("schemathesis")
        .current_dir(scratch.path())
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", SCHEMATHESIS_DIR)
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(format!("{SCHEMATHESIS_DIR}/schemathesis.toml"))
        .args(["run", DOCUMENT])
        .args(["--url", url, "--include-path-regex", paths])
        // Positive data the server refuses is expected: the document cannot say which strings
        // are phone numbers.
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "50", "--seed", "1", "--no-color"])
        .args(extra)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let summary: String = report
        .lines()
        .filter(|l| l.contains("generated") || l.contains("Tested:"))
        .collect::<Vec<_>>()
        .join("; ");
    println!("schemathesis {paths}: {summary}");
    assert!(
        output.status.success(),
        "schemathesis {paths} found problems:\n{}\n{}",
        report.chars().take(20_000).collect::<String>(),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    common::require_tools("schemathesis", &["schemathesis"]);
    let server = start();
    let api = format!("http://{}", server.api);
    let webhooks = format!("https://{}", server.webhook);
    let cert = server.dir.path().join("cert.pem");
    let cert = cert.to_str().unwrap();
    let bearer = |secret: &str| format!("Authorization: Bearer {secret}");

    schemathesis(
        "^/(v1|healthz|metrics)",
        &api,
        &["--header", &bearer(API_TOKEN)],
    );
    schemathesis(
        "^/webhooks/lox24$",
        &webhooks,
        &["--tls-verify", cert, "--header", &bearer(SECRET)],
    );
    schemathesis(
        "^/webhooks/sendios$",
        &webhooks,
        &["--tls-verify", cert, "--header", &bearer(SENDIOS_SECRET)],
    );
    // Last: its wrong-SdkAppid cases count as failed authentications and would otherwise turn
    // the other webhooks' cases into 429s.
    schemathesis("^/webhooks/tencent$", &webhooks, &["--tls-verify", cert]);

    let logs = server.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}
