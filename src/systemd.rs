//! The service manager's side channel (`sd_notify`): `READY=1` once the store is open and both
//! listeners serve, `RELOADING=1` … `READY=1` around a certificate reload, `STOPPING=1` when
//! shutdown begins, `EXTEND_TIMEOUT_USEC` while the database opens, and `WATCHDOG=1` pings for as
//! long as the store's committer keeps answering.
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset, i.e. not started by systemd.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::store::Store;

/// The socket is a blocking datagram socket: a manager that does not read it (its queue is
/// full) would stall one of the runtime's few worker threads with each message. The send runs
/// on a blocking thread instead, and awaiting it keeps at most one message per caller waiting;
/// a message that cannot be delivered is late either way.
async fn send(states: Vec<NotifyState<'static>>) {
    match tokio::task::spawn_blocking(move || sd_notify::notify(&states)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot notify the service manager: {e}"),
        Err(e) => tracing::warn!("notifying the service manager failed: {e}"),
    }
}

pub async fn ready() {
    send(vec![NotifyState::Ready, NotifyState::Status("serving")]).await;
}

pub async fn reloading() {
    send(vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading the TLS certificate"),
    ])
    .await;
}

pub async fn stopping() {
    send(vec![
        NotifyState::Stopping,
        NotifyState::Status("finishing in-flight requests"),
    ])
    .await;
}

/// Pings the watchdog at half its interval, but only while a barrier sent through the committer
/// comes back in time: a wedged committer means acknowledged-nothing, and systemd should restart
/// the service rather than let providers time out forever. A committer held up by a reopen of
/// the database is not wedged: the reopen is a start's open and takes as long, and a restart
/// would only begin it again. Returns at once without a watchdog.
pub async fn watchdog(store: Arc<Store>) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = timeout / 2;
    tracing::info!("systemd watchdog enabled: pinging every {period:?}");
    let mut ticks = tokio::time::interval(period.max(Duration::from_millis(10)));
    loop {
        ticks.tick().await;
        match tokio::time::timeout(period, store.ping()).await {
            Ok(Ok(())) => send(vec![NotifyState::Watchdog]).await,
            _ if store.is_reopening() => {
                send(vec![
                    NotifyState::Watchdog,
                    NotifyState::Status("reopening the database after a storage failure"),
                ])
                .await
            }
            Ok(Err(e)) => {
                tracing::error!("store is not answering ({e}); withholding the watchdog ping")
            }
            Err(_) => tracing::error!(
                "store committer did not answer within {period:?}; withholding the watchdog ping"
            ),
        }
    }
}

/// Runs `opening` (the database's open and recovery, which grows with the list) while telling
/// the service manager, every few seconds, to extend its start timeout: a large list must not
/// be killed half-opened by `TimeoutStartSec` and restarted into the same open.
pub async fn while_opening<T>(opening: impl std::future::Future<Output = T>) -> T {
    const EXTEND_EVERY: Duration = Duration::from_secs(10);
    const EXTEND_BY_USEC: u32 = 30_000_000;
    tokio::pin!(opening);
    let mut ticks = tokio::time::interval(EXTEND_EVERY);
    loop {
        tokio::select! {
            done = &mut opening => return done,
            _ = ticks.tick() => send(vec![
                NotifyState::ExtendTimeoutUsec(EXTEND_BY_USEC),
                NotifyState::Status("opening the database"),
            ]).await,
        }
    }
}
