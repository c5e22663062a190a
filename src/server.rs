//! The two listeners and their connections: the public HTTPS webhook listener and the local
//! plain-HTTP API. `run` accepts until `shutdown` resolves, then stops accepting, lets in-flight
//! requests finish (bounded), and closes the store, which answers every queued commit first.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::auth::ApiTokens;
use crate::metrics::Metrics;
use crate::phone::Normalizer;
use crate::store::Store;
use crate::tls::Tls;
use crate::webhooks::WebhookConfig;
use crate::{api, webhooks};

/// A client must finish its TLS handshake within this time (hyper has no handshake timeout).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a request's headers within this time (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
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
}

pub struct Listeners {
    pub webhook: TcpListener,
    pub api: TcpListener,
}

#[derive(Clone, Copy)]
enum Side {
    Webhook,
    Api,
}

pub async fn run(
    listeners: Listeners,
    tls: Arc<Tls>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // The local API is HTTP/1.1 only: skipping protocol detection is measurably faster on the
    // single-lookup path.
    let mut api_builder = hyper::server::conn::http1::Builder::new();
    api_builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let api_builder = Arc::new(api_builder);

    tokio::pin!(shutdown);
    loop {
        let (side, accepted) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listeners.webhook.accept() => (Side::Webhook, accepted),
            accepted = listeners.api.accept() => (Side::Api, accepted),
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Typically out of file descriptors; back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (state, watcher) = (state.clone(), graceful.watcher());
        match side {
            Side::Webhook => {
                let (tls, builder) = (tls.acceptor(), builder.clone());
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                    else {
                        return;
                    };
                    let connection =
                        builder.serve_connection(TokioIo::new(stream), service(side, state));
                    // Errors here are clients going away or speaking garbage; nothing to act on.
                    let _ = watcher.watch(connection).await;
                });
            }
            Side::Api => {
                let builder = api_builder.clone();
                tokio::spawn(async move {
                    let connection =
                        builder.serve_connection(TokioIo::new(stream), service(side, state));
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
                Side::Webhook => webhooks::handle(&state, request).await,
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
