//! What every request handler is given: the store, the number normaliser, metrics, the enabled
//! providers with their credentials and the API's tokens. Built once by `serve`, shared by the
//! listeners in `server`, read by `api`, `webhooks` and `transfer`; it depends on none of them.

use std::sync::Arc;

use crate::auth::{ApiTokens, FailureLimiter};
use crate::metrics::Metrics;
use crate::phone::Normalizer;
use crate::providers::tencent::TencentConfig;
use crate::secret::Secret;
use crate::store::Store;

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
}

/// Which providers are enabled, with their credentials.
#[derive(Debug, Default, Clone)]
pub struct WebhookConfig {
    pub lox24: Option<Secret>,
    pub tencent: Option<TencentConfig>,
    pub sendios: Option<Secret>,
}
