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
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

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
    /// One per API thread, all bound to the same address with SO_REUSEPORT: the kernel spreads
    /// new connections over them and each thread serves its own, as nginx's workers do, so a
    /// lookup is never handed from one thread to another.
    pub api: Vec<std::net::TcpListener>,
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

/// What an API thread needs to serve its listener.
#[derive(Clone)]
struct ApiServing {
    state: Arc<AppState>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    builder: Arc<hyper::server::conn::http1::Builder>,
    close_requested: watch::Receiver<bool>,
}

/// Serves both listeners until `shutdown` resolves. `tls` is `None` only with
/// `--insecure-http`, when a proxy in front terminates TLS. Webhooks are served on the caller's
/// runtime; the API on threads of its own (see [`Listeners::api`]).
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
    let listeners_max = listeners.max_connections;
    let webhook_slots = Arc::new(Semaphore::new(listeners.max_connections));
    let api_slots = Arc::new(Semaphore::new(listeners.max_connections));
    let api_threads = spawn_api_threads(
        listeners.api,
        ApiServing {
            state: state.clone(),
            slots: api_slots.clone(),
            max_connections: listeners_max,
            builder: Arc::new(api_builder),
            close_requested: close_requested.clone(),
        },
    );
    let mut refused_in_a_row = 0u64;

    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listeners.webhook.accept() => accepted,
        };
        let Some((stream, peer, slot)) = admit(
            accepted,
            Side::Webhook,
            &webhook_slots,
            listeners_max,
            &mut refused_in_a_row,
            &state,
        )
        .await
        else {
            continue;
        };
        let close_requested = close_requested.clone();
        let state = state.clone();
        let (tls, builder) = (tls.as_ref().map(|tls| tls.acceptor()), builder.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // HTTP/2 clients keep answering hyper's pings, so only the absence of requests
            // tells an idle connection from a live one.
            let activity = Arc::new(Activity::new());
            let service = service(Side::Webhook, state, peer.ip(), Some(activity.clone()));
            let idle = Some((activity, header_read_timeout));
            let Some(tls) = tls else {
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                return drive(connection, close_requested, idle, |c| c.graceful_shutdown()).await;
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
            let mut close_requested = close_requested;
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

    drop(listeners.webhook);
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
    // Each API thread ends once its own connections have, or the grace is over.
    let joined = tokio::task::spawn_blocking(move || {
        for thread in api_threads {
            let _ = thread.join();
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
}

/// Takes a connection slot for an accepted connection. Over the limit the connection is closed
/// at once, so the clients already connected keep their share of the machine; a flood is logged
/// when it starts and when it ends, not once per connection.
async fn admit(
    accepted: std::io::Result<(TcpStream, std::net::SocketAddr)>,
    side: Side,
    slots: &Arc<Semaphore>,
    max_connections: usize,
    refused_in_a_row: &mut u64,
    state: &AppState,
) -> Option<(TcpStream, std::net::SocketAddr, OwnedSemaphorePermit)> {
    let (stream, peer) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => {
            // Typically out of file descriptors; back off instead of spinning.
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return None;
        }
    };
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        state.metrics.connection_refused(side.name());
        if *refused_in_a_row == 0 {
            tracing::warn!(
                listener = side.name(),
                %peer,
                "refusing connections: {max_connections} already open (--max-connections)"
            );
        }
        *refused_in_a_row += 1;
        return None;
    };
    if *refused_in_a_row > 0 {
        tracing::info!(
            listener = side.name(),
            "accepting connections again after refusing {refused_in_a_row}"
        );
        *refused_in_a_row = 0;
    }
    let _ = stream.set_nodelay(true);
    Some((stream, peer, slot))
}

/// Starts one thread per API listener, each with a single-threaded runtime. A thread that
/// cannot start drops its listener, which takes it out of the kernel's SO_REUSEPORT group, so
/// no connection waits on a socket nobody accepts from.
fn spawn_api_threads(
    listeners: Vec<std::net::TcpListener>,
    serving: ApiServing,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let serving = serving.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("api-{i}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(serve_api(listener, serving)),
                    Err(e) => tracing::error!("API thread {i} cannot start its runtime: {e}"),
                }
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => tracing::error!("cannot start API thread {i}: {e}"),
        }
    }
    threads
}

/// One API thread: accepts on its listener until shutdown, then lets its connections finish.
async fn serve_api(listener: std::net::TcpListener, serving: ApiServing) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("an API listener cannot be served: {e}");
            return;
        }
    };
    let mut close_requested = serving.close_requested.clone();
    let mut connections = tokio::task::JoinSet::new();
    let mut refused_in_a_row = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = close_requested.changed() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let Some((stream, peer, slot)) = admit(
            accepted,
            Side::Api,
            &serving.slots,
            serving.max_connections,
            &mut refused_in_a_row,
            &serving.state,
        )
        .await
        else {
            continue;
        };
        let service = service(Side::Api, serving.state.clone(), peer.ip(), None);
        let connection = serving
            .builder
            .serve_connection(TokioIo::new(stream), service);
        let close_requested = serving.close_requested.clone();
        connections.spawn(async move {
            let _slot = slot;
            // HTTP/1 only: hyper's header read timeout already ends idle keep-alive.
            drive(connection, close_requested, None, |c| c.graceful_shutdown()).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
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
    TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(e, addr, flag))
}

/// Binds `count` listening sockets to `addr` with SO_REUSEPORT, one per API thread (see
/// [`Listeners::api`]).
pub async fn bind_shared(
    addr: std::net::SocketAddr,
    count: usize,
    flag: &str,
) -> Result<Vec<std::net::TcpListener>, String> {
    // SO_REUSEPORT would let a second suppressd of the same user bind a port that is in use and
    // silently take part of its connections: a plain bind first refuses such a port, as it
    // would be refused without the option.
    if addr.port() != 0 {
        drop(bind(addr, flag).await?);
    }
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let listener = socket
            .and_then(|socket| {
                socket.set_reuseaddr(true)?;
                socket.set_reuseport(true)?;
                socket.bind(addr)?;
                socket.listen(LISTEN_BACKLOG)
            })
            .map_err(|e| bind_error(e, addr, flag))?;
        // With port 0 the first socket's port is where the others go.
        addr = listener
            .local_addr()
            .map_err(|e| bind_error(e, addr, flag))?;
        listeners.push(listener.into_std().map_err(|e| bind_error(e, addr, flag))?);
    }
    Ok(listeners)
}

/// Connections the kernel queues for a listener before it accepts them (tokio's default).
const LISTEN_BACKLOG: u32 = 1024;

fn bind_error(e: std::io::Error, addr: std::net::SocketAddr, flag: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("{flag} {addr} is already in use by another process; stop it or choose another address")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("{flag} {addr}: permission denied; ports below 1024 need CAP_NET_BIND_SERVICE")
        }
        _ => format!("cannot listen on {flag} {addr}: {e}"),
    }
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
