//! Several nodes sharing one list through a NATS JetStream stream: three real `nats-server`
//! processes forming a JetStream cluster on loopback and three real suppressd nodes, each with
//! its own data directory, talked to over HTTPS and HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::{lox24_event, now, Options, Server};
use futures_util::future::join_all;
use serde_json::{json, Value};

/// Starts nodes `a`, `b` and `c` on `nats`, with every provider enabled, and waits until each
/// has reached the stream.
fn nodes(nats: &NatsCluster) -> Vec<Server> {
    ["a", "b", "c"]
        .iter()
        .map(|name| {
            Server::start(Options {
                sendios: true,
                tencent: Some(None),
                extra: vec![
                    "--cluster-nats".into(),
                    nats.urls(),
                    "--node-name".into(),
                    (*name).into(),
                ],
                ..Options::default()
            })
        })
        .collect()
}

/// Waits until `check` holds, or fails the test with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node's consumer delivered a first event: the stream exists and its
/// leaders are elected.
async fn settled(nodes: &[Server]) {
    let probe = ["+4930999000000".to_owned()];
    let reply = nodes[0]
        .lox24(lox24_event(
            "00000000-0000-4000-8000-0000000000ff",
            &probe[0],
            1_600_000_000,
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for node in nodes {
        eventually(
            Duration::from_secs(30),
            "the stream reaches every node",
            || missing(node, &probe),
        )
        .await;
    }
}

/// Whether every phone in `phones` is suppressed on `node` (one bulk check per 10,000).
async fn missing(node: &Server, phones: &[String]) -> bool {
    for chunk in phones.chunks(10_000) {
        let reply = node
            .api("POST", "/v1/check", json!({ "phones": chunk }).to_string())
            .await;
        if reply.status != 200 {
            return false;
        }
        let all = reply.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["suppressed"] == true);
        if !all {
            return false;
        }
    }
    true
}

async fn history(node: &Server, path: &str) -> Value {
    node.get(&format!("{path}/history")).await.json()
}

/// A node's export as a set of lines.
async fn export(node: &Server) -> BTreeSet<String> {
    let reply = node.get("/v1/export").await;
    assert_eq!(reply.status, 200);
    reply.text.lines().map(str::to_owned).collect()
}

/// `senders` concurrent senders, each sending `per_sender` new unsubscribes to the nodes in
/// turn (`target` picks the node of the i-th delivery); returns the numbers some node answered
/// 200 and how many deliveries got anything else (a failed connection included).
async fn load(
    nodes: &[Server],
    tag: u32,
    senders: u32,
    per_sender: u32,
    target: impl Fn(u32, u32) -> usize,
) -> (Vec<String>, usize) {
    let runs = (0..senders).map(|sender| {
        let target = &target;
        async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..per_sender {
                let phone = format!("+49{tag:02}{sender:03}{i:06}");
                let id = format!("{tag:08x}-{sender:04x}-4000-8000-{i:012x}");
                let node = &nodes[target(sender, i) % nodes.len()];
                match node
                    .try_lox24(lox24_event(&id, &phone, 1_700_000_000 + i64::from(i)))
                    .await
                {
                    Some(200) => acked.push(phone),
                    _ => failed += 1,
                }
            }
            (acked, failed)
        }
    });
    let mut acked = Vec::new();
    let mut failed = 0;
    for (mut a, f) in join_all(runs).await {
        acked.append(&mut a);
        failed += f;
    }
    (acked, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_on_one_node_is_on_the_others_within_two_seconds_with_the_same_history() {
    let nats = NatsCluster::start(3);
    let nodes = nodes(&nats);
    settled(&nodes).await;

    let phone = "+4930123450001";
    let phones = [phone.to_owned()];
    let started = Instant::now();
    let reply = nodes[0]
        .lox24(lox24_event(
            "8d7f0c4e-0000-4000-8000-00000000a001",
            phone,
            now(),
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for node in &nodes[1..] {
        eventually(
            Duration::from_secs(2).saturating_sub(started.elapsed()),
            "a delivery answered 200 by node a is suppressed on b and c",
            || missing(node, &phones),
        )
        .await;
    }
    let path = format!("/v1/phones/{phone}");
    let on_a = history(&nodes[0], &path).await;
    assert_eq!(on_a["events"].as_array().unwrap().len(), 1, "{on_a}");
    for node in &nodes[1..] {
        assert_eq!(history(node, &path).await, on_a);
        assert_eq!(
            node.get(&path).await.json(),
            nodes[0].get(&path).await.json()
        );
    }
    assert_eq!(
        nodes[1]
            .metric("suppressd_cluster_replicated_events_total")
            .await,
        2.0,
        "the probe and the delivery"
    );
    let health = nodes[1].get("/healthz").await.json();
    assert_eq!(health["cluster"], "connected", "{health}");
    assert_eq!(health["pending_events"], 0, "{health}");

    // A new node with an empty data directory joins and catches up from the stream.
    let joined = Server::start(Options {
        extra: vec![
            "--cluster-nats".into(),
            nats.urls(),
            "--node-name".into(),
            "d".into(),
        ],
        ..Options::default()
    });
    eventually(
        Duration::from_secs(10),
        "a new node catches up from the stream",
        || missing(&joined, &phones),
    )
    .await;
    assert_eq!(history(&joined, &path).await, on_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_loses_nothing_and_catches_up_within_ten_seconds() {
    let nats = NatsCluster::start(3);
    let mut nodes = nodes(&nats);
    settled(&nodes).await;

    let (acked, _) = {
        let load = load(&nodes, 1, 6, 60, |sender, i| (sender + i) as usize);
        let kill = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            nodes[0].signal(libc::SIGKILL);
        };
        tokio::join!(load, kill).0
    };
    nodes[0].reap();
    assert!(
        acked.len() > 100,
        "only {} deliveries acknowledged",
        acked.len()
    );
    for node in &nodes[1..] {
        eventually(
            Duration::from_secs(10),
            "every number a node answered 200 is suppressed on b and c",
            || missing(node, &acked),
        )
        .await;
    }
    nodes[0].restart();
    let restarted = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the restarted node catches up to every number",
        || missing(&nodes[0], &acked),
    )
    .await;
    eprintln!(
        "{} acknowledged; node a caught up {:?} after its restart",
        acked.len(),
        restarted.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_mid_load_loses_nothing_and_deliveries_stay_200() {
    let mut nats = NatsCluster::start(3);
    let nodes = nodes(&nats);
    settled(&nodes).await;

    let (acked, failed) = {
        let load = load(&nodes, 2, 6, 60, |sender, i| (sender * 7 + i) as usize);
        let kill = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            nats.kill(1);
        };
        tokio::join!(load, kill).0
    };
    assert_eq!(
        failed, 0,
        "every delivery is answered 200 while one NATS server is gone"
    );
    for node in &nodes {
        eventually(
            Duration::from_secs(20),
            "every acknowledged number reaches every node",
            || missing(node, &acked),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_nats_server_nodes_serve_and_queue_then_converge() {
    let mut nats = NatsCluster::start(3);
    let nodes = nodes(&nats);
    settled(&nodes).await;
    let (before, _) = load(&nodes, 3, 3, 10, |sender, i| (sender + i) as usize).await;

    nats.kill_all();
    for node in &nodes {
        eventually(
            Duration::from_secs(10),
            "/healthz says disconnected",
            || async { node.get("/healthz").await.json()["cluster"] == "disconnected" },
        )
        .await;
        let health = node.get("/healthz").await;
        assert_eq!(health.status, 200, "{}", health.text);
        // Lookups keep answering from the local store.
        assert!(missing(node, &before).await);
    }
    let (during, failed) = load(&nodes, 4, 3, 10, |sender, i| (sender + i) as usize).await;
    assert_eq!(failed, 0, "deliveries are answered 200 without the stream");
    assert_eq!(during.len(), 30);
    let mut queued = 0;
    for node in &nodes {
        queued += node.get("/healthz").await.json()["pending_events"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(queued, 30, "every delivery waits for the stream");

    nats.start_all();
    let everything: Vec<String> = before.iter().chain(&during).cloned().collect();
    for node in &nodes {
        eventually(
            Duration::from_secs(60),
            "every node ends with every number",
            || missing(node, &everything),
        )
        .await;
    }
    let first = export(&nodes[0]).await;
    for node in &nodes[1..] {
        assert_eq!(export(node).await, first, "the same export on every node");
    }
    for node in &nodes {
        eventually(Duration::from_secs(10), "the queue empties", || async {
            node.get("/healthz").await.json()["pending_events"] == 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_lifts_and_imports_behave_on_a_cluster_as_on_one_node() {
    let nats = NatsCluster::start(3);
    let nodes = nodes(&nats);
    settled(&nodes).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Tencent on a.
    let tencent = json!({
        "CallbackCommand": "OfficialAccount.CallbackAfterDeleteSubscriber",
        "Official_Account": "oa1",
        "SubscribeAccountList": [{"Subscriber_Account": "jared", "Operator_Account": "admin", "EventTime": 1_670_574_414_u64}],
    });
    let url = format!(
        "/webhooks/tencent?SdkAppid={}&CallbackCommand=OfficialAccount.CallbackAfterDeleteSubscriber",
        common::TENCENT_APP
    );
    assert_eq!(a.webhook(&url, &[], tencent.to_string()).await.status, 200);

    // Three Sendios losses of one account, one on each node, in no particular order.
    let lost = |sms: i64, ts: i64| {
        json!({"0": {"event": "sms_lost", "client_user_id": "u7", "project_id": "42", "sms_id": sms, "ts": ts}})
            .to_string()
    };
    assert_eq!(c.sendios(lost(3, 1_700_000_003)).await.status, 200);
    assert_eq!(a.sendios(lost(1, 1_700_000_001)).await.status, 200);
    assert_eq!(b.sendios(lost(2, 1_700_000_002)).await.status, 200);

    // An import on c.
    let imported = ["+4930777000001", "+4930777000002"];
    let reply = c.import_list(&imported).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // A lift with a note on b beats an unsubscribe that happened before it, delivered late to c.
    let phone = "+4930777000009";
    let first = lox24_event("8d7f0c4e-0000-4000-8000-00000000b001", phone, now() - 3600);
    assert_eq!(a.lox24(first).await.status, 200);
    let path = format!("/v1/phones/{phone}");
    eventually(
        Duration::from_secs(5),
        "the unsubscribe reaches b",
        || async { b.get(&path).await.json()["suppressed"] == true },
    )
    .await;
    let lift = b
        .api(
            "DELETE",
            &path,
            json!({"note": "opted back in by SMS"}).to_string(),
        )
        .await;
    assert_eq!(lift.status, 200, "{}", lift.text);
    let late = lox24_event("8d7f0c4e-0000-4000-8000-00000000b002", phone, now() - 1800);
    assert_eq!(c.lox24(late).await.status, 200);

    for node in &nodes {
        eventually(Duration::from_secs(10), "every node agrees", || async {
            let record = node.get(&path).await.json();
            let history = history(node, &path).await;
            let account = node.get("/v1/accounts/sendios:42/u7").await.json();
            let scope = node.get("/v1/accounts/tencent:oa1/jared").await.json();
            record["suppressed"] == false
                && history["events"].as_array().map_or(0, Vec::len) == 3
                && account["suppressed"] == true
                && account["reasons"][0]["kind"] == "undeliverable"
                && scope["suppressed"] == true
                && missing(node, &imported.map(str::to_owned)).await
        })
        .await;
    }
    let first = export(a).await;
    for node in [b, c] {
        assert_eq!(export(node).await, first, "the same export on every node");
    }
    // A lift without a note over that unsubscribe would be refused on any node.
    let newer = lox24_event("8d7f0c4e-0000-4000-8000-00000000b003", phone, now() + 60);
    assert_eq!(a.lox24(newer).await.status, 200);
    eventually(
        Duration::from_secs(5),
        "the new unsubscribe reaches c",
        || async { c.get(&path).await.json()["suppressed"] == true },
    )
    .await;
    let refused = c.api("DELETE", &path, "").await;
    assert_eq!(refused.status, 400, "{}", refused.text);
}
