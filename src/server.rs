//! The two listeners and their connections: the public HTTPS webhook listener and the local
//! plain-HTTP API. `run` accepts until `shutdown` resolves, then stops accepting and lets
//! in-flight requests finish (bounded); the store is its caller's to close.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::state::AppState;
use crate::tls::Tls;
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
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

pub struct Listeners {
    pub webhook: TcpListener,
    pub api: TcpListener,
    /// Most open connections per listener; further ones are closed as soon as accepted.
    pub max_connections: usize,
    /// A client must send a request's headers within this time (slowloris protection). hyper
    /// starts the same timer whenever an HTTP/1 connection waits for its next request, so it is
    /// also the idle keep-alive timeout; webhook connections (HTTP/2 too) are closed after this
    /// long without a request in flight.
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
    // Connections watch this to close gracefully; the connection slots tell when all have.
    let (closing, close_requested) = watch::channel(false);
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
    let listeners_max = listeners.max_connections;
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
        let mut close_requested = close_requested.clone();
        let state = state.clone();
        match (side, &tls) {
            (Side::Webhook, tls) => {
                let (tls, builder) = (tls.as_ref().map(|tls| tls.acceptor()), builder.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    // HTTP/2 clients keep answering hyper's pings, so only the absence of
                    // requests tells an idle connection from a live one.
                    let activity = Arc::new(Activity::new());
                    let service = service(side, state, peer.ip(), Some(activity.clone()));
                    let idle = Some((activity, header_read_timeout));
                    let Some(tls) = tls else {
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        return drive(connection, close_requested, idle, |c| c.graceful_shutdown())
                            .await;
                    };
                    let stream = match tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        answer_plain_http(stream),
                    )
                    .await
                    {
                        Ok(Some(stream)) => stream,
                        _ => return,
                    };
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream));
                    let stream = tokio::select! {
                        accepted = handshake => match accepted {
                            Ok(Ok(stream)) => stream,
                            _ => return,
                        },
                        _ = close_requested.changed() => return,
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    drive(connection, close_requested, idle, |c| c.graceful_shutdown()).await;
                });
            }
            (Side::Api, _) => {
                let builder = api_builder.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = service(side, state, peer.ip(), None);
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    // HTTP/1 only: hyper's header read timeout already ends idle keep-alive.
                    drive(connection, close_requested, None, |c| c.graceful_shutdown()).await;
                });
            }
        }
    }

    drop(listeners);
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = closing.send(true);
    let every_slot = u32::try_from(listeners_max).unwrap_or(u32::MAX);
    let all_closed = async {
        let _webhook = webhook_slots.acquire_many(every_slot).await;
        let _api = api_slots.acquire_many(every_slot).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, all_closed)
        .await
        .is_err()
    {
        tracing::warn!("some connections were still busy after {SHUTDOWN_GRACE:?}; closing them");
    }
}

/// A TLS connection opens with a handshake record (0x16); one that opens with a letter is a
/// plain-HTTP request (`GET`, `POST`), usually an `http://` URL in a provider's console. It gets
/// a 400 that says to use `https://` instead of a failed handshake the client shows as a reset.
/// Returns the stream when it is TLS.
async fn answer_plain_http(mut stream: TcpStream) -> Option<TcpStream> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0].is_ascii_uppercase() => {}
        Ok(1) => return Some(stream),
        _ => return None,
    }
    let body = serde_json::json!({
        "error": "this port speaks HTTPS: send the request to an https:// URL",
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Unread request bytes would turn the close into a reset that loses the answer.
    let mut request = vec![0u8; MAX_HEADER_BYTES];
    let _ = stream.read(&mut request).await;
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut request).await, Ok(n) if n > 0) {}
    })
    .await;
    None
}

fn service(
    side: Side,
    state: Arc<AppState>,
    peer: IpAddr,
    activity: Option<Arc<Activity>>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = crate::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<crate::response::Response, Infallible>> + Send,
> + Clone {
    service_fn(move |request| {
        let state = state.clone();
        let in_flight = activity.as_ref().map(InFlight::begin);
        async move {
            let _in_flight = in_flight;
            Ok::<_, Infallible>(match side {
                Side::Webhook => webhooks::handle(&state, request, peer).await,
                Side::Api => api::handle(&state, request).await,
            })
        }
    })
}

/// Drives one connection to its end. It is closed gracefully (in-flight requests answered)
/// when the server shuts down, and, with `idle`, once no request has been in flight for that
/// long.
async fn drive<C, E>(
    connection: C,
    mut close_requested: watch::Receiver<bool>,
    idle: Option<(Arc<Activity>, Duration)>,
    close: impl Fn(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(connection);
    let mut closing = false;
    let mut next_idle_check = idle
        .as_ref()
        .map(|(_, timeout)| tokio::time::Instant::now() + *timeout);
    loop {
        let idle_check = async {
            match next_idle_check {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Errors here are clients going away or speaking garbage; nothing to act on.
            _ = connection.as_mut() => return,
            _ = close_requested.changed(), if !closing => {
                close(connection.as_mut());
                closing = true;
            }
            () = idle_check, if !closing => {
                let Some((activity, timeout)) = &idle else { continue };
                let idle_for = activity.idle_for();
                if idle_for >= *timeout {
                    close(connection.as_mut());
                    closing = true;
                } else {
                    next_idle_check = Some(tokio::time::Instant::now() + (*timeout - idle_for));
                }
            }
        }
    }
}

/// Request activity on one connection.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// When the last request finished, in milliseconds after `opened`.
    last_finished_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_finished_ms: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long no request has been in flight; zero while one is.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_finished_ms.load(Ordering::SeqCst);
        Duration::from_millis(self.elapsed_ms().saturating_sub(last))
    }
}

/// One request in flight; dropped when its response future ends.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamped before the count drops, so an idle check never sees an old stamp with no
        // request in flight.
        self.0
            .last_finished_ms
            .store(self.0.elapsed_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
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
