//! The two listeners and their connections: the public HTTPS webhook listener and the local
//! plain-HTTP API. `run` accepts until `shutdown` resolves, then stops accepting, lets in-flight
//! requests finish (bounded), and closes the store, which answers every queued commit first.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::auth::{ApiTokens, FailureLimiter};
use crate::metrics::Metrics;
use crate::phone::Normalizer;
use crate::store::Store;
use crate::tls::Tls;
use crate::webhooks::WebhookConfig;
use crate::{api, webhooks};

/// A client must finish its TLS handshake within this time (hyper has no handshake timeout).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (start line and headers); larger ones are answered 431. On the webhook
/// listener this is hyper's read buffer limit (hyper-util's auto builder has no separate head
/// limit), which a TLS record (16 KiB) fits into twice.
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// HTTP/2 connections are pinged at this interval and closed when a ping goes unanswered for
/// the header read timeout.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Concurrent streams per HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 128;
/// How long shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Everything a request handler needs.
pub struct AppState {
    pub store: Store,
    pub phones: Normalizer,
    pub metrics: Arc<Metrics>,
    pub webhooks: WebhookConfig,
    /// `None` when the API is open (loopback only).
    pub api_tokens: Option<ApiTokens>,
    /// Per-address budget of failed webhook authentications.
    pub auth_failures: FailureLimiter,
}

pub struct Listeners {
    pub webhook: TcpListener,
    pub api: TcpListener,
    /// Most open connections per listener; further ones are closed as soon as accepted.
    pub max_connections: usize,
    /// A client must send a request's headers within this time (slowloris protection). hyper
    /// starts the same timer whenever an HTTP/1 connection waits for its next request, so it is
    /// also the idle keep-alive timeout.
    pub header_read_timeout: Duration,
}

#[derive(Clone, Copy)]
enum Side {
    Webhook,
    Api,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Webhook => "webhook",
            Side::Api => "api",
        }
    }
}

/// Serves both listeners until `shutdown` resolves. `tls` is `None` only with
/// `--insecure-http`, when a proxy in front terminates TLS.
pub async fn run(
    listeners: Listeners,
    tls: Option<Arc<Tls>>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let header_read_timeout = listeners.header_read_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(header_read_timeout);
    let builder = Arc::new(builder);
    // The local API is HTTP/1.1 only: skipping protocol detection is measurably faster on the
    // single-lookup path.
    let mut api_builder = hyper::server::conn::http1::Builder::new();
    api_builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    let api_builder = Arc::new(api_builder);
    let webhook_slots = Arc::new(Semaphore::new(listeners.max_connections));
    let api_slots = Arc::new(Semaphore::new(listeners.max_connections));
    let (mut webhook_refused, mut api_refused) = (0u64, 0u64);

    tokio::pin!(shutdown);
    loop {
        let (side, accepted) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listeners.webhook.accept() => (Side::Webhook, accepted),
            accepted = listeners.api.accept() => (Side::Api, accepted),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors; back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (slots, refused_in_a_row) = match side {
            Side::Webhook => (&webhook_slots, &mut webhook_refused),
            Side::Api => (&api_slots, &mut api_refused),
        };
        // Over the limit the connection is closed at once, so the clients already connected
        // keep their share of the machine. A flood is logged when it starts and when it ends,
        // not once per connection.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.metrics.connection_refused(side.name());
            if *refused_in_a_row == 0 {
                tracing::warn!(
                    listener = side.name(),
                    %peer,
                    "refusing connections: {} already open (--max-connections)",
                    listeners.max_connections
                );
            }
            *refused_in_a_row += 1;
            drop(stream);
            continue;
        };
        if *refused_in_a_row > 0 {
            tracing::info!(
                listener = side.name(),
                "accepting connections again after refusing {refused_in_a_row}"
            );
            *refused_in_a_row = 0;
        }
        let _ = stream.set_nodelay(true);
        let (state, watcher) = (state.clone(), graceful.watcher());
        let service = service(side, state, peer.ip());
        match (side, &tls) {
            (Side::Webhook, Some(tls)) => {
                let (tls, builder) = (tls.acceptor(), builder.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                    else {
                        return;
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    // Errors here are clients going away or speaking garbage; nothing to act on.
                    let _ = watcher.watch(connection).await;
                });
            }
            (Side::Webhook, None) => {
                let builder = builder.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(connection).await;
                });
            }
            (Side::Api, _) => {
                let builder = api_builder.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(connection).await;
                });
            }
        }
    }

    drop(listeners);
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still busy after {SHUTDOWN_GRACE:?}; closing them");
    }
    state.store.close(SHUTDOWN_GRACE).await;
    tracing::info!("store flushed and closed");
}

fn service(
    side: Side,
    state: Arc<AppState>,
    peer: IpAddr,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = crate::web::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<crate::web::Response, Infallible>> + Send,
> + Clone {
    service_fn(move |request| {
        let state = state.clone();
        async move {
            Ok::<_, Infallible>(match side {
                Side::Webhook => webhooks::handle(&state, request, peer).await,
                Side::Api => api::handle(&state, request).await,
            })
        }
    })
}

/// Binds a listener, turning "address in use" into an instruction.
pub async fn bind(addr: std::net::SocketAddr, flag: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("{flag} {addr} is already in use by another process; stop it or choose another address")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("{flag} {addr}: permission denied; ports below 1024 need CAP_NET_BIND_SERVICE")
        }
        _ => format!("cannot listen on {flag} {addr}: {e}"),
    })
}

/// Resolves a listen address (`IP:PORT` or `NAME:PORT`).
pub fn resolve(addr: &str, flag: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{flag} {addr:?} is not a usable address (expected HOST:PORT): {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{flag} {addr:?} resolves to no address"));
    }
    Ok(addrs)
}
