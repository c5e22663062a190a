//! What every request handler is given: the store (and the cluster, when the node is part of
//! one), the number normaliser, metrics, the enabled providers with their credentials and the
//! API's tokens. Built once by `serve`, shared by the listeners in `server`, read by `api`,
//! `webhooks` and `transfer`; it depends on none of them.

use std::sync::Arc;

use crate::auth::{ApiTokens, FailureLimiter};
use crate::cluster::Cluster;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::phone::Normalizer;
use crate::providers::tencent::TencentConfig;
use crate::secret::Secret;
use crate::store::{Outcome, Store, StoreError};

/// Everything a request handler needs.
pub struct AppState {
    pub store: Arc<Store>,
    pub phones: Normalizer,
    pub metrics: Arc<Metrics>,
    pub webhooks: WebhookConfig,
    /// `None` when the API is open (loopback only).
    pub api_tokens: Option<ApiTokens>,
    /// Per-address budget of failed webhook authentications.
    pub auth_failures: FailureLimiter,
    /// `None` for a node that stands alone (no `--cluster-nats`).
    pub cluster: Option<Cluster>,
}

impl AppState {
    /// Commits events this node accepted (a webhook, a manual change, an import): durable in
    /// the store, and on a cluster also published to the stream (see `cluster`).
    pub async fn commit(&self, events: Vec<Event>) -> Result<Vec<Outcome>, StoreError> {
        match &self.cluster {
            Some(cluster) => cluster.commit(events).await,
            None => self.store.commit(events).await,
        }
    }
}

/// Which providers are enabled, with their credentials.
#[derive(Debug, Default, Clone)]
pub struct WebhookConfig {
    pub lox24: Option<Secret>,
    pub tencent: Option<TencentConfig>,
    pub sendios: Option<Secret>,
}
