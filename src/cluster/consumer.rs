//! This node's durable consumer of the stream: every event any node accepted, this one's
//! included, committed to the local store and only then acknowledged.
//!
//! The consumer is named after the node (`--node-name`) and remembers on the NATS servers how
//! far the node got, across lost connections. The node also remembers it (the *applied mark*,
//! the last stream sequence its store holds), and at each start makes the consumer again from
//! there (the stream's start for an empty directory): a data directory that is new or was
//! restored from a backup is behind what the consumer says. Messages are taken as they come
//! and committed together, so a burst costs one group commit; an event the node already has
//! (its own, coming back) is a duplicate by idempotency key and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use futures_util::{FutureExt, StreamExt};

use super::{Link, Remembered};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::store::{Outcome, Store};

/// Messages committed together at most.
const APPLY_BATCH: usize = 512;
/// How long a message may wait for its acknowledgement before the servers deliver it again
/// (a batch is acknowledged as soon as it is committed; a second delivery is a duplicate).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// After the consumer failed (servers gone, store down), the next attempt waits this long.
const RETRY: Duration = Duration::from_secs(1);
/// The servers send a heartbeat this often while there is nothing to deliver; missing ones
/// end the consumer's messages, which is then started again.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Applies the stream to the store for as long as the service runs.
pub(super) async fn apply(link: Arc<Link>, store: Arc<Store>, metrics: Arc<Metrics>) {
    let mut mark = Remembered::read(&link.config.dir, "applied");
    let mut failing = false;
    let mut started = false;
    loop {
        if !link.connected() {
            // The connection's own events say when it is lost and back.
            tokio::time::sleep(RETRY).await;
            continue;
        }
        match consume(&link, &store, &metrics, &mut mark, &mut started).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                tracing::warn!("the stream's consumer stopped ({e}); trying again");
                failing = true;
            }
            Err(e) => tracing::debug!("the stream's consumer failed again: {e}"),
        }
        tokio::time::sleep(RETRY / 4).await;
    }
}

/// Consumes until the connection or the store fails.
async fn consume(
    link: &Link,
    store: &Store,
    metrics: &Metrics,
    mark: &mut Remembered,
    started: &mut bool,
) -> Result<(), String> {
    let connection = link.connections();
    let stream = link.stream().await?;
    let mut consumer = durable_consumer(link, &stream, mark.value, !*started).await?;
    *started = true;
    if let Ok(info) = consumer.info().await {
        tracing::info!(
            consumer = %link.config.node,
            applied = mark.value,
            pending = info.num_pending,
            "applying the stream's events"
        );
        metrics.cluster_lag(info.num_pending);
    }
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(APPLY_BATCH)
        .heartbeat(HEARTBEAT)
        .expires(HEARTBEAT * 5)
        .messages()
        .await
        .map_err(|e| format!("consumer {}: {e}", link.config.node))?;
    let mut watch = tokio::time::interval(RETRY / 4);
    loop {
        let first = tokio::select! {
            first = messages.next() => first,
            _ = watch.tick() => {
                if link.connections() != connection {
                    // Reconnected: the pull requests went with the old connection.
                    return Ok(());
                }
                continue;
            }
        };
        let Some(first) = first else {
            return Err("the consumer's messages ended".into());
        };
        let mut batch = vec![first.map_err(|e| e.to_string())?];
        while batch.len() < APPLY_BATCH {
            match messages.next().now_or_never() {
                Some(Some(message)) => batch.push(message.map_err(|e| e.to_string())?),
                _ => break,
            }
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut last_seq = mark.value;
        let mut lag = 0;
        for message in &batch {
            if let Ok(info) = message.info() {
                last_seq = last_seq.max(info.stream_sequence);
                lag = info.pending;
            }
            match serde_json::from_slice::<Event>(&message.payload) {
                Ok(event) => events.push(event),
                Err(e) => tracing::error!(
                    seq = last_seq,
                    "a message of the stream is not an event; it is skipped: {e}"
                ),
            }
        }
        let outcomes = store
            .commit_replicated(events)
            .await
            .map_err(|e| format!("committing the stream's events failed: {e}"))?;
        let new = outcomes
            .iter()
            .filter(|o| **o != Outcome::Duplicate)
            .count();
        metrics.cluster_replicated(new as u64);
        metrics.cluster_lag(lag);
        for message in &batch {
            message
                .ack()
                .await
                .map_err(|e| format!("acknowledging to the stream failed: {e}"))?;
        }
        mark.set(last_seq);
    }
}

/// This node's consumer. At the process's start it is made again from `applied`, the node's own
/// mark: the servers may think it further along than the node's store (a new or restored data
/// directory, a crash before the mark was written), and a process that died left pull requests
/// behind to which the servers would hand messages nobody acknowledges until `ACK_WAIT` ends.
async fn durable_consumer(
    link: &Link,
    stream: &async_nats::jetstream::stream::Stream,
    applied: u64,
    afresh: bool,
) -> Result<PullConsumer, String> {
    let name = &link.config.node;
    if let Ok(info) = stream.consumer_info(name).await {
        if !afresh && info.ack_floor.stream_sequence <= applied {
            return stream
                .get_consumer(name)
                .await
                .map_err(|e| format!("consumer {name}: {e}"));
        }
        if info.ack_floor.stream_sequence > applied {
            tracing::info!(
                consumer = %name,
                acknowledged = info.ack_floor.stream_sequence,
                applied,
                "this node's store is behind its consumer (a new or restored data directory, or a crash before the node noted how far it got); it starts again from the store"
            );
        }
        stream
            .delete_consumer(name)
            .await
            .map_err(|e| format!("consumer {name}: {e}"))?;
    }
    let deliver_policy = match applied {
        0 => DeliverPolicy::All,
        applied => DeliverPolicy::ByStartSequence {
            start_sequence: applied + 1,
        },
    };
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("consumer {name}: {e}"))
}
