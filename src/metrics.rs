//! Counters and histograms, rendered in the Prometheus text format on `GET /metrics`.
//!
//! Kept deliberately small: a handful of labelled counters behind one mutex (webhooks are
//! hundreds to thousands per second, far below where that lock matters) and lock-free atomics for
//! the per-lookup hot path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds, in seconds, of the latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&bound| secs <= bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Rendered label set → count, e.g. `source="lox24",outcome="accepted",status="200"`.
    webhooks: Mutex<BTreeMap<String, u64>>,
    /// Events acknowledged but not applied: `source`, `reason`.
    ignored: Mutex<BTreeMap<String, u64>>,
    /// Batch entries that could not identify their subject: `source`, `reason`.
    skipped: Mutex<BTreeMap<String, u64>>,
    /// Connections closed at accept because the listener was full: `listener`.
    refused_connections: Mutex<BTreeMap<String, u64>>,
    /// Webhook requests answered 429 because their address failed authentication too often.
    auth_rate_limited: AtomicU64,
    lookups_single: AtomicU64,
    lookups_bulk: AtomicU64,
    webhook_latency: Histogram,
    api_latency: Histogram,
    flush_latency: Histogram,
    write_failures: AtomicU64,
    reopens: AtomicU64,
    rebuilds: AtomicU64,
    flushed_requests: AtomicU64,
    log_bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
    snapshots_written: AtomicU64,
    cluster: ClusterMetrics,
}

/// What a cluster node counts; rendered, with its live state, only on a node of a cluster.
#[derive(Default)]
struct ClusterMetrics {
    lag: AtomicU64,
    published: AtomicU64,
    replicated: AtomicU64,
}

/// A cluster node's live state, as `/metrics` and `/healthz` show it.
pub struct ClusterStatus {
    pub connected: bool,
    pub pending: u64,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    let mut map = match map.lock() {
        Ok(map) => map,
        Err(poisoned) => poisoned.into_inner(),
    };
    *map.entry(key).or_default() += 1;
}

impl Metrics {
    /// One webhook request and how it ended (`accepted`, `duplicate`, `ignored`, `rejected`).
    pub fn webhook(&self, source: &str, outcome: &str, status: u16, elapsed: Duration) {
        bump(
            &self.webhooks,
            format!("source=\"{source}\",outcome=\"{outcome}\",status=\"{status}\""),
        );
        self.webhook_latency.observe(elapsed);
    }

    /// An event that was acknowledged without changing anything, and why.
    pub fn ignored(&self, source: &str, reason: &str) {
        bump(
            &self.ignored,
            format!("source=\"{source}\",reason=\"{}\"", escape_label(reason)),
        );
    }

    /// A batch entry that was skipped because it cannot identify its subject, and why.
    pub fn skipped(&self, source: &str, reason: &str) {
        bump(
            &self.skipped,
            format!("source=\"{source}\",reason=\"{}\"", escape_label(reason)),
        );
    }

    pub fn connection_refused(&self, listener: &str) {
        bump(
            &self.refused_connections,
            format!("listener=\"{listener}\""),
        );
    }

    pub fn auth_rate_limited(&self) {
        self.auth_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lookups(&self, bulk: bool, count: u64) {
        let counter = if bulk {
            &self.lookups_bulk
        } else {
            &self.lookups_single
        };
        counter.fetch_add(count, Ordering::Relaxed);
    }

    pub fn api_request(&self, elapsed: Duration) {
        self.api_latency.observe(elapsed);
    }

    pub fn store_flushed(&self, elapsed: Duration, requests: usize, ok: bool) {
        self.flush_latency.observe(elapsed);
        if ok {
            self.flushed_requests
                .fetch_add(requests as u64, Ordering::Relaxed);
        } else {
            self.store_write_failed();
        }
    }

    /// A batch whose writes could not be applied or made durable.
    pub fn store_write_failed(&self) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The database was reopened after a storage failure.
    pub fn store_reopened(&self) {
        self.reopens.fetch_add(1, Ordering::Relaxed);
    }

    /// The database was rebuilt from the snapshot and the log.
    pub fn store_rebuilt(&self) {
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages of the stream this node's consumer has not been delivered yet.
    pub fn cluster_lag(&self, lag: u64) {
        self.cluster.lag.store(lag, Ordering::Relaxed);
    }

    /// Events published to the stream and acknowledged by it.
    pub fn cluster_published(&self, events: u64) {
        self.cluster.published.fetch_add(events, Ordering::Relaxed);
    }

    /// Events from the stream that were new to this node.
    pub fn cluster_replicated(&self, events: u64) {
        self.cluster.replicated.fetch_add(events, Ordering::Relaxed);
    }

    /// A snapshot was written and read back.
    pub fn snapshot_written(&self) {
        self.snapshots_written.fetch_add(1, Ordering::Relaxed);
    }

    /// What the log's segments and the kept snapshots occupy on disk now.
    pub fn log_and_snapshot_bytes(&self, log: u64, snapshots: u64) {
        self.log_bytes.store(log, Ordering::Relaxed);
        self.snapshot_bytes.store(snapshots, Ordering::Relaxed);
    }

    /// `suppressed` is (phones, accounts) suppressed now.
    pub fn render(
        &self,
        size_on_disk: Option<u64>,
        suppressed: (u64, u64),
        cluster: Option<ClusterStatus>,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP suppressd_suppressed_subjects Subjects suppressed now, by type.\n# TYPE suppressd_suppressed_subjects gauge\nsuppressd_suppressed_subjects{{type=\"phone\"}} {}\nsuppressd_suppressed_subjects{{type=\"account\"}} {}",
            suppressed.0, suppressed.1
        );
        render_counter_map(
            &mut out,
            "suppressd_webhook_requests_total",
            "Webhook requests by source, outcome and HTTP status.",
            &self.webhooks,
        );
        render_counter_map(
            &mut out,
            "suppressd_webhook_ignored_events_total",
            "Events acknowledged without effect, by source and reason.",
            &self.ignored,
        );
        render_counter_map(
            &mut out,
            "suppressd_webhook_skipped_entries_total",
            "Batch entries skipped because they cannot identify their subject, by source and reason.",
            &self.skipped,
        );
        render_counter_map(
            &mut out,
            "suppressd_connections_refused_total",
            "Connections closed at accept because --max-connections were open, by listener.",
            &self.refused_connections,
        );
        render_value(
            &mut out,
            "suppressd_webhook_auth_rate_limited_total",
            "counter",
            "Webhook requests answered 429 after repeated authentication failures from their address.",
            self.auth_rate_limited.load(Ordering::Relaxed),
        );
        out.push_str("# HELP suppressd_lookups_total Subjects looked up, single or in bulk.\n");
        out.push_str("# TYPE suppressd_lookups_total counter\n");
        let single = self.lookups_single.load(Ordering::Relaxed);
        let bulk = self.lookups_bulk.load(Ordering::Relaxed);
        let _ = writeln!(out, "suppressd_lookups_total{{mode=\"single\"}} {single}");
        let _ = writeln!(out, "suppressd_lookups_total{{mode=\"bulk\"}} {bulk}");
        for (name, help, histogram) in [
            (
                "suppressd_webhook_request_duration_seconds",
                "Webhook request latency.",
                &self.webhook_latency,
            ),
            (
                "suppressd_api_request_duration_seconds",
                "Local API request latency.",
                &self.api_latency,
            ),
            (
                "suppressd_store_flush_duration_seconds",
                "Group-commit sync (log append + fdatasync, then the database write) latency.",
                &self.flush_latency,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            histogram.render(&mut out, name, "");
        }
        render_value(
            &mut out,
            "suppressd_store_write_failures_total",
            "counter",
            "Group commits that could not be applied or made durable (nothing in them was acknowledged).",
            self.write_failures.load(Ordering::Relaxed),
        );
        render_value(
            &mut out,
            "suppressd_store_reopens_total",
            "counter",
            "Times the database was reopened to recover from a storage failure (a full disk, an I/O error).",
            self.reopens.load(Ordering::Relaxed),
        );
        render_value(
            &mut out,
            "suppressd_store_rebuilds_total",
            "counter",
            "Times the database was rebuilt from the snapshot and the log because it could not be trusted.",
            self.rebuilds.load(Ordering::Relaxed),
        );
        render_value(
            &mut out,
            "suppressd_store_snapshots_total",
            "counter",
            "Snapshots written and read back.",
            self.snapshots_written.load(Ordering::Relaxed),
        );
        render_value(
            &mut out,
            "suppressd_store_log_bytes",
            "gauge",
            "Bytes the log's segments occupy on disk.",
            self.log_bytes.load(Ordering::Relaxed),
        );
        render_value(
            &mut out,
            "suppressd_store_snapshot_bytes",
            "gauge",
            "Bytes the kept snapshots occupy on disk.",
            self.snapshot_bytes.load(Ordering::Relaxed),
        );
        render_value(
            &mut out,
            "suppressd_store_committed_requests_total",
            "counter",
            "Requests made durable by group commits.",
            self.flushed_requests.load(Ordering::Relaxed),
        );
        if let Some(gauges) = cluster {
            let counted = &self.cluster;
            for (name, kind, help, value) in [
                (
                    "suppressd_cluster_connected",
                    "gauge",
                    "1 while the node is connected to the stream's NATS servers.",
                    u64::from(gauges.connected),
                ),
                (
                    "suppressd_cluster_pending_events",
                    "gauge",
                    "Events this node accepted that wait to be published to the stream.",
                    gauges.pending,
                ),
                (
                    "suppressd_cluster_consumer_lag",
                    "gauge",
                    "Messages of the stream this node's consumer has not been delivered yet.",
                    counted.lag.load(Ordering::Relaxed),
                ),
                (
                    "suppressd_cluster_published_events_total",
                    "counter",
                    "Events published to the stream and acknowledged by it.",
                    counted.published.load(Ordering::Relaxed),
                ),
                (
                    "suppressd_cluster_replicated_events_total",
                    "counter",
                    "Events from the stream that were new to this node.",
                    counted.replicated.load(Ordering::Relaxed),
                ),
            ] {
                render_value(&mut out, name, kind, help, value);
            }
        }
        if let Some(bytes) = size_on_disk {
            render_value(
                &mut out,
                "suppressd_store_size_bytes",
                "gauge",
                "Database size on disk.",
                bytes,
            );
        }
        out
    }
}

/// One unlabelled metric with its HELP and TYPE lines.
fn render_value(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn render_counter_map(
    out: &mut String,
    name: &str,
    help: &str,
    map: &Mutex<BTreeMap<String, u64>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let map = match map.lock() {
        Ok(map) => map,
        Err(poisoned) => poisoned.into_inner(),
    };
    for (labels, count) in map.iter() {
        let _ = writeln!(out, "{name}{{{labels}}} {count}");
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
