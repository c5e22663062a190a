//! Several nodes sharing one list through a NATS JetStream stream (`--cluster-nats`).
//!
//! Every node takes webhooks, manual changes and imports as a node standing alone does: an
//! event is durable in the node's own log first (`fdatasync`ed; NATS syncs its file store only
//! periodically, so a PubAck is not a promise that the event is on any disk). It is then
//! published to the stream with `Nats-Msg-Id` set to its idempotency key, and the request is
//! answered once the stream acknowledged it — a quorum of the stream's replicas holds it — or,
//! when the stream cannot be reached, once it is queued: an opt-out on one node's disk is better
//! than one refused to a provider that never retries ([`outbox`]). The queue survives restarts
//! because it is the log itself: a node remembers up to which sequence everything it accepted
//! was acknowledged, republishes the rest at start, and keeps those log segments until then.
//!
//! Every node, the one that accepted an event included, applies the stream through a durable
//! consumer named after itself ([`consumer`]): each batch is committed to the node's store like
//! any request (an event it already has changes nothing, by idempotency key) before it is
//! acknowledged. A node that was down, or is new, catches up from where its consumer stood.
//!
//! Nodes converge because a record is a function of the set of its events, whatever order they
//! arrived in (see `store::record`): events accepted by different nodes at the same moment reach
//! every node, in different orders, and make the same records and histories everywhere.

mod consumer;
mod outbox;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::event::Event;
use crate::metrics::{ClusterStatus, Metrics};
use crate::store::{Outcome, Store, StoreError};
use outbox::Outbox;

/// How long a request waits for the stream to acknowledge its events before it is answered
/// anyway, its events queued: long enough for the client to move to another NATS server, short
/// enough for a provider's timeout.
const ACK_PATIENCE: Duration = Duration::from_secs(3);
/// How long JetStream remembers a `Nats-Msg-Id` to drop a second publication of the same event.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// How the node reaches the stream, from the `--cluster-*` flags.
pub struct ClusterConfig {
    pub servers: Vec<String>,
    /// Names the node's durable consumer: letters, digits, `-` and `_`.
    pub node: String,
    pub stream: String,
    pub replicas: usize,
    pub auth: Option<Auth>,
    /// Where the node keeps what it remembers of the stream (`cluster/` in the data directory).
    pub dir: PathBuf,
}

/// NATS credentials, read from `--cluster-creds-file`.
pub enum Auth {
    /// A `.creds` file (user JWT and NKey seed).
    Credentials(PathBuf),
    Token(String),
}

impl Auth {
    /// A file holding a user JWT is a credentials file; anything else is a token.
    pub fn read(path: &Path) -> Result<Auth, String> {
        let text = crate::auth::read_secret_file(path, "--cluster-creds-file")?;
        Ok(if text.contains("BEGIN NATS USER JWT") {
            Auth::Credentials(path.to_path_buf())
        } else {
            Auth::Token(text)
        })
    }
}

/// Whether a node name can name a durable consumer.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A running node's link to the stream.
pub struct Cluster {
    link: Arc<Link>,
    outbox: Arc<Outbox>,
    store: Arc<Store>,
}

impl Cluster {
    /// Connects (in the background when the servers cannot be reached yet: the node serves
    /// meanwhile) and starts the publisher and the consumer.
    pub async fn start(
        config: ClusterConfig,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, String> {
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("suppressd {}", config.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let counted = counted.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            counted.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("connected to the stream's NATS servers");
                        }
                        async_nats::Event::Disconnected => tracing::warn!(
                            "disconnected from the stream's NATS servers; accepted events are queued until they are back"
                        ),
                        // Every failed attempt to reconnect is one; the disconnection said it.
                        async_nats::Event::ClientError(e) => tracing::debug!("NATS: {e}"),
                        other => tracing::info!("NATS: {other}"),
                    }
                }
            });
        match &config.auth {
            Some(Auth::Credentials(path)) => {
                options = options.credentials_file(path).await.map_err(|e| {
                    format!(
                        "--cluster-creds-file {} is not a NATS credentials file: {e}",
                        path.display()
                    )
                })?;
            }
            Some(Auth::Token(token)) => options = options.token(token.clone()),
            None => {}
        }
        let client = options
            .connect(config.servers.clone())
            .await
            .map_err(|e| format!("--cluster-nats {}: {e}", config.servers.join(",")))?;
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| format!("cannot create {}: {e}", config.dir.display()))?;
        let context = jetstream::new(client.clone());
        let link = Arc::new(Link {
            context,
            config,
            client,
            connections,
        });
        let outbox = Arc::new(Outbox::new());
        tokio::spawn(outbox::publish(
            link.clone(),
            outbox.clone(),
            store.clone(),
            metrics.clone(),
        ));
        tokio::spawn(consumer::apply(link.clone(), store.clone(), metrics));
        Ok(Cluster {
            link,
            outbox,
            store,
        })
    }

    /// Commits events this node accepted: durable in its log, then published to the stream.
    /// Returns once the stream acknowledged them, or once they are queued when it could not be
    /// reached in time.
    pub async fn commit(&self, events: Vec<Event>) -> Result<Vec<Outcome>, StoreError> {
        let ticket = self.outbox.ticket(self.store.applied_through());
        let committed = self.store.commit_numbered(events.clone()).await?;
        let outcomes: Vec<Outcome> = committed.iter().map(|(outcome, _)| *outcome).collect();
        let new: Vec<(u64, Event)> = committed
            .into_iter()
            .zip(events)
            .filter_map(|((_, seq), event)| seq.map(|seq| (seq, event)))
            .collect();
        let acked = self.outbox.enqueue(new, ticket);
        if self.link.connected() {
            // Not acknowledged in time: queued, and published once the stream takes it.
            let _ = tokio::time::timeout(ACK_PATIENCE, acked).await;
        }
        Ok(outcomes)
    }

    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            connected: self.link.connected(),
            pending: self.outbox.len(),
        }
    }
}

/// What the publisher and the consumer share: the connection and where things are.
struct Link {
    client: async_nats::Client,
    context: jetstream::Context,
    config: ClusterConfig,
    /// Connections made so far: a consumer that began before the latest one starts again
    /// rather than wait for its pull requests, lost with the old connection, to time out.
    connections: Arc<AtomicU64>,
}

impl Link {
    /// The subject events are published on.
    fn subject(&self) -> String {
        format!("{}.events", self.config.stream)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The stream, created with `--cluster-replicas` replicas if it does not exist yet. Its
    /// retention is unlimited: a node that joins later catches up from the stream's start.
    async fn stream(&self) -> Result<stream::Stream, String> {
        self.context
            .get_or_create_stream(stream::Config {
                name: self.config.stream.clone(),
                subjects: vec![self.subject()],
                num_replicas: self.config.replicas,
                duplicate_window: DUPLICATE_WINDOW,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("stream {}: {e}", self.config.stream))
    }
}

/// A number remembered in a small file of the cluster directory, replaced whole (written aside,
/// then renamed): losing a recent value only means doing a little work again, never skipping
/// any, so it needs no sync.
struct Remembered {
    path: PathBuf,
    value: u64,
}

impl Remembered {
    fn read(dir: &Path, name: &str) -> Remembered {
        let path = dir.join(name);
        let value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        Remembered { path, value }
    }

    fn set(&mut self, value: u64) {
        if value == self.value {
            return;
        }
        self.value = value;
        let aside = self.path.with_extension("tmp");
        let written = std::fs::write(&aside, format!("{value}\n"))
            .and_then(|()| std::fs::rename(&aside, &self.path));
        if let Err(e) = written {
            tracing::warn!(
                "cannot remember {value} in {}: {e} (a restart redoes a little more work)",
                self.path.display()
            );
        }
    }
}
