//! `suppressd serve`: turns the flags into a running service. Everything that can be wrong with
//! the configuration is checked here, before anything listens, and reported as one line that says
//! what to fix.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::auth::{self, ApiTokens, FailureLimiter};
use crate::cli::ServeArgs;
use crate::cluster::{self, Auth, Cluster, ClusterConfig};
use crate::metrics::Metrics;
use crate::phone::Normalizer;
use crate::providers::tencent::TencentConfig;
use crate::secret::Secret;
use crate::server::{self, Listeners};
use crate::state::{AppState, WebhookConfig};
use crate::store::{Rules, SnapshotPolicy, Store, StoreConfig, StoreError};
use crate::systemd;
use crate::tls::{CertSource, Tls};

/// Failed webhook authentications an address may make per window before it is answered 429.
const AUTH_FAILURES_PER_WINDOW: u32 = 20;
const AUTH_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A startup failure: the message is the one line the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl StartupError {
    /// Process exit code: 1 for configuration problems, 3 when the database cannot be used.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::Config(_) => 1,
            StartupError::Store(_) => 3,
        }
    }
}

impl From<String> for StartupError {
    fn from(message: String) -> Self {
        StartupError::Config(message)
    }
}

pub async fn serve(
    args: ServeArgs,
    api_token_file: Option<&std::path::Path>,
) -> Result<(), StartupError> {
    let phones = Normalizer::new(args.default_region.as_deref())?;
    let certs = if args.insecure_http {
        None
    } else {
        Some(CertSource::from_flags(
            args.tls_cert.clone(),
            args.tls_key.clone(),
            &args.data_dir,
        )?)
    };
    let api_token_file = or_credential(api_token_file.map(Path::to_path_buf), "api-token");
    let api_tokens = api_token_file.as_deref().map(ApiTokens::read).transpose()?;
    let api_addrs = server::resolve(&args.api_listen, "--api-listen")?;
    if api_tokens.is_none() && !api_addrs.iter().all(is_loopback) {
        return Err(StartupError::Config(format!(
            "--api-listen {} is not a loopback address; give --api-token-file so the API is not open to the network",
            args.api_listen
        )));
    }
    let webhook_addrs = server::resolve(&args.webhook_listen, "--webhook-listen")?;
    let tencent = match (&args.tencent_sdkappid, &args.tencent_token_file) {
        (Some(sdkappid), token_file) => Some(TencentConfig {
            sdkappid: sdkappid.trim().to_owned(),
            token: or_credential(token_file.clone(), "tencent-token")
                .as_deref()
                .map(|path| auth::read_secret_file(path, "--tencent-token-file"))
                .transpose()?,
            max_skew_secs: args.tencent_max_skew,
        }),
        (None, Some(_)) => {
            return Err(StartupError::Config(
                "--tencent-token-file was given without --tencent-sdkappid; give the SDKAppID to enable Tencent".into(),
            ))
        }
        (None, None) => None,
    };
    let webhooks = WebhookConfig {
        lox24: read_secret(
            or_credential(args.lox24_secret_file.clone(), "lox24-secret"),
            "--lox24-secret-file",
        )?,
        tencent,
        sendios: read_secret(
            or_credential(args.sendios_secret_file.clone(), "sendios-secret"),
            "--sendios-secret-file",
        )?,
    };
    if webhooks.lox24.is_none() && webhooks.tencent.is_none() && webhooks.sendios.is_none() {
        tracing::warn!(
            "no provider is enabled (give --lox24-secret-file, --tencent-sdkappid or --sendios-secret-file); every webhook will be answered 404"
        );
    }
    for (provider, enabled) in [
        ("lox24", webhooks.lox24.is_some()),
        ("tencent", webhooks.tencent.is_some()),
        ("sendios", webhooks.sendios.is_some()),
    ] {
        if enabled {
            tracing::info!("{provider} enabled at /webhooks/{provider}");
        }
    }
    if webhooks.tencent.as_ref().is_some_and(|t| t.token.is_none()) {
        tracing::warn!("Tencent webhooks are enabled without --tencent-token-file: requests are checked by SdkAppid only");
    }

    let cluster = cluster_config(&args)?;

    // Bound before anything is written to the data directory: a start that cannot listen
    // leaves no trace there.
    let api_threads = match args.api_threads {
        0 => {
            std::thread::available_parallelism().map_or(1, |cores| (usize::from(cores) / 2).max(1))
        }
        n => usize::from(n),
    };
    let listeners = Listeners {
        webhook: server::bind(webhook_addrs[0], "--webhook-listen").await?,
        api: server::bind_shared(api_addrs[0], api_threads, "--api-listen").await?,
        max_connections: args.max_connections as usize,
        header_read_timeout: std::time::Duration::from_secs(args.request_header_timeout.max(1)),
    };

    let metrics = Arc::new(Metrics::default());
    let store_config = StoreConfig {
        cache_bytes: args.cache_mb.saturating_mul(1024 * 1024),
        lookup_cache_bytes: args.lookup_cache_mb.saturating_mul(1024 * 1024),
        rules: Rules {
            lost_threshold: args.sendios_lost_threshold,
        },
        segment_bytes: args.log_segment_mb * 1024 * 1024,
        snapshots: SnapshotPolicy {
            every_bytes: args.snapshot_every_mb.saturating_mul(1024 * 1024),
            every_events: args.snapshot_every_events,
            every: std::time::Duration::from_secs(args.snapshot_every_seconds.max(1)),
        },
        ..StoreConfig::new(args.data_dir.clone())
    };
    let store = {
        let metrics = metrics.clone();
        systemd::while_opening(tokio::task::spawn_blocking(move || {
            Store::open(&store_config, metrics)
        }))
        .await
        .map_err(|e| StartupError::Config(format!("opening the database panicked: {e}")))??
    };
    let tls = match certs {
        Some(certs) => Some(Arc::new(Tls::load(certs)?)),
        None => {
            tracing::warn!(
                "--insecure-http: webhooks are served over plain HTTP; only run this behind a proxy that terminates TLS"
            );
            None
        }
    };

    phones.warm();
    let store = Arc::new(store);
    let cluster = match cluster {
        Some(config) => {
            tracing::info!(
                node = %config.node,
                stream = %config.stream,
                servers = %config.servers.join(","),
                "cluster mode: events are shared through the NATS JetStream stream"
            );
            Some(Cluster::start(config, store.clone(), metrics.clone()).await?)
        }
        None => None,
    };
    let state = Arc::new(AppState {
        store: store.clone(),
        phones,
        metrics,
        webhooks,
        api_tokens,
        auth_failures: FailureLimiter::new(AUTH_FAILURES_PER_WINDOW, AUTH_FAILURE_WINDOW),
        cluster,
    });
    tracing::info!(
        webhook = %local_addr(&listeners.webhook),
        api = %listeners
            .api
            .first()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "?".to_owned(), |a| a.to_string()),
        api_threads = listeners.api.len(),
        data_dir = %args.data_dir.display(),
        "suppressd ready"
    );
    systemd::ready().await;
    if let Some(tls) = &tls {
        tokio::spawn(reload_on_sighup(tls.clone()));
    }
    tokio::spawn(systemd::watchdog(store.clone()));
    let shutdown = async {
        shutdown_signal().await;
        systemd::stopping().await;
    };
    server::run(listeners, tls, state, shutdown).await;
    // Every queued commit is answered before the store closes.
    store.close(server::SHUTDOWN_GRACE).await;
    tracing::info!("store flushed and closed");
    Ok(())
}

/// The cluster's configuration from the `--cluster-*` flags; `None` without `--cluster-nats`.
fn cluster_config(args: &ServeArgs) -> Result<Option<ClusterConfig>, String> {
    let servers: Vec<String> = args
        .cluster_nats
        .iter()
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    if servers.is_empty() {
        return Ok(None);
    }
    for url in &servers {
        url.parse::<async_nats::ServerAddr>()
            .map_err(|e| format!("--cluster-nats {url:?} is not a NATS server address: {e}"))?;
    }
    let node = match &args.node_name {
        Some(node) => node.trim().to_owned(),
        None => host_name()
            .ok_or("--node-name is not given and the host name cannot be read; give --node-name")?,
    };
    if !cluster::valid_node_name(&node) {
        return Err(format!(
            "--node-name {node:?} must be 1 to 64 letters, digits, '-' or '_' (it names the node's consumer of the stream)"
        ));
    }
    if !cluster::valid_node_name(&args.cluster_stream) {
        return Err(format!(
            "--cluster-stream {:?} must be 1 to 64 letters, digits, '-' or '_'",
            args.cluster_stream
        ));
    }
    let auth = or_credential(args.cluster_creds_file.clone(), "cluster-creds")
        .as_deref()
        .map(Auth::read)
        .transpose()?;
    Ok(Some(ClusterConfig {
        servers,
        node,
        stream: args.cluster_stream.clone(),
        replicas: usize::from(args.cluster_replicas),
        auth,
        dir: args.data_dir.join("cluster"),
    }))
}

/// The machine's host name, as the kernel knows it.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

fn read_secret(path: Option<PathBuf>, flag: &str) -> Result<Option<Secret>, String> {
    path.map(|path| auth::read_secret_file(&path, flag).map(|s| Secret::new(s.as_bytes())))
        .transpose()
}

/// A secret file flag that was not given falls back to the systemd credential of that name
/// (`LoadCredential=lox24-secret:/etc/suppressd/lox24-secret`), so a unit needs no flag for it.
fn or_credential(flag: Option<PathBuf>, credential: &str) -> Option<PathBuf> {
    flag.or_else(|| {
        let path = PathBuf::from(std::env::var_os("CREDENTIALS_DIRECTORY")?).join(credential);
        path.is_file().then(|| {
            tracing::info!("using systemd credential {}", path.display());
            path
        })
    })
}

/// SIGHUP re-reads the webhook certificate and key (e.g. after a renewal). Connections stay
/// open and new handshakes get the new pair; a pair that does not load keeps the old one.
async fn reload_on_sighup(tls: Arc<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; certificate reloads need a restart");
        return;
    };
    while hangups.recv().await.is_some() {
        systemd::reloading().await;
        match tls.reload() {
            Ok(fingerprint) => tracing::info!(
                "SIGHUP: reloaded the TLS certificate (SHA-256 fingerprint {fingerprint})"
            ),
            Err(e) => tracing::error!(
                "SIGHUP: keeping the previous TLS certificate (SHA-256 fingerprint {}): {e}",
                tls.fingerprint()
            ),
        }
        systemd::ready().await;
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn local_addr(listener: &tokio::net::TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
