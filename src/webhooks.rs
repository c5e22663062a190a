//! The public HTTPS listener: routes provider webhooks to their parser and the store.
//!
//! Every webhook goes through the same checks, in this order, so that a caller learns the most
//! basic problem first: unknown path or provider not enabled (404) → method (405) → credential
//! (401 none / 403 wrong; 429 instead while the caller's address has failed authentication too
//! often) → body size (413) → payload (400). The response is sent only after the store has made
//! the request's effect durable (see ARCHITECTURE.md, "no 2xx before durable").

use std::net::IpAddr;
use std::time::Instant;

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::auth;
use crate::error::HttpError;
use crate::event::{ms_to_secs, now_ms};
use crate::providers::tencent;
use crate::providers::{lox24, sendios};
use crate::response::{json_response, Response};
use crate::secret::{AuthFailure, Secret};
use crate::state::AppState;
use crate::store::Outcome;
use crate::web::{discard_body, query_param, read_body, Request};

/// Largest accepted webhook body: 1 MiB (exactly 1,048,576 bytes is still accepted).
pub const MAX_BODY: usize = 1024 * 1024;

pub async fn handle(state: &AppState, request: Request, peer: IpAddr) -> Response {
    let started = Instant::now();
    let hooks = &state.webhooks;
    match request.uri().path() {
        "/webhooks/lox24" if hooks.lox24.is_some() => {
            let result = lox24_delivery(state, request, peer).await;
            finish(state, "lox24", started, result, HttpError::into_response)
        }
        "/webhooks/tencent" if hooks.tencent.is_some() => {
            let result = tencent_delivery(state, request, peer).await;
            finish(state, "tencent", started, result, tencent_error)
        }
        "/webhooks/sendios" if hooks.sendios.is_some() => {
            let result = sendios_delivery(state, request, peer).await;
            finish(state, "sendios", started, result, HttpError::into_response)
        }
        _ => {
            discard_body(request).await;
            HttpError::NotFound.into_response()
        }
    }
}

/// What a webhook request ended as, for the response, the log and the metrics.
struct Handled {
    outcome: &'static str,
    body: serde_json::Value,
}

fn finish(
    state: &AppState,
    source: &'static str,
    started: Instant,
    result: Result<Handled, HttpError>,
    render_error: fn(HttpError) -> Response,
) -> Response {
    match result {
        Ok(handled) => {
            state
                .metrics
                .webhook(source, handled.outcome, 200, started.elapsed());
            json_response(StatusCode::OK, &handled.body)
        }
        Err(error) => {
            let status = error.status();
            if status.is_server_error() {
                tracing::error!(
                    source,
                    status = status.as_u16(),
                    "webhook not acknowledged: {error}"
                );
            } else {
                tracing::info!(
                    source,
                    status = status.as_u16(),
                    field = error.field(),
                    "webhook rejected: {error}"
                );
            }
            state
                .metrics
                .webhook(source, "rejected", status.as_u16(), started.elapsed());
            render_error(error)
        }
    }
}

/// Refuses a request before its body matters, draining the body so the client sees the status.
async fn refuse(request: Request, error: HttpError) -> HttpError {
    discard_body(request).await;
    error
}

/// Authenticates a shared-secret provider's POST and reads its body.
async fn authenticated_body(
    state: &AppState,
    peer: IpAddr,
    secret: &Secret,
    request: Request,
) -> Result<bytes::Bytes, HttpError> {
    if request.method() != Method::POST {
        return Err(refuse(request, HttpError::MethodNotAllowed { allow: "POST" }).await);
    }
    if let Err(error) = auth_budget(state, peer) {
        return Err(refuse(request, error).await);
    }
    let token = query_param(request.uri().query(), "token");
    if let Err(failure) = auth::check_webhook_secret(secret, request.headers(), token.as_deref()) {
        record_auth_failure(state, peer);
        return Err(refuse(request, HttpError::auth(failure)).await);
    }
    read_body(request, MAX_BODY).await
}

/// 429 while `peer` has used up its budget of failed authentications.
fn auth_budget(state: &AppState, peer: IpAddr) -> Result<(), HttpError> {
    state.auth_failures.check(peer).map_err(|left| {
        state.metrics.auth_rate_limited();
        HttpError::TooManyAuthFailures {
            retry_after_secs: left.as_secs().max(1),
        }
    })
}

/// Logged once per address and window, when the budget runs out, rather than on every 429.
fn record_auth_failure(state: &AppState, peer: IpAddr) {
    if state.auth_failures.record_failure(peer) {
        tracing::warn!(
            %peer,
            "too many failed webhook authentications from this address; answering 429 for a while"
        );
    }
}

/// How a request's committed events ended, for responses and metrics.
/// Names the fields a delivery lacked, once it is stored: a redelivery stored nothing, so it
/// says nothing.
fn log_absent_fields(source: &str, outcome: &str, warnings: &[String]) {
    if !warnings.is_empty() && outcome == "accepted" {
        tracing::warn!(source, "stored with fields absent: {}", warnings.join("; "));
    }
}

fn outcome_of(outcomes: &[Outcome]) -> &'static str {
    if !outcomes.is_empty() && outcomes.iter().all(|o| *o == Outcome::Duplicate) {
        "duplicate"
    } else {
        "accepted"
    }
}

async fn lox24_delivery(
    state: &AppState,
    request: Request,
    peer: IpAddr,
) -> Result<Handled, HttpError> {
    let Some(secret) = &state.webhooks.lox24 else {
        return Err(HttpError::NotFound);
    };
    let body = authenticated_body(state, peer, secret, request).await?;
    match lox24::parse(&body, &state.phones, now_ms())? {
        lox24::Delivery::Ignored { name } => {
            state.metrics.ignored("lox24", "other_event_name");
            tracing::info!(
                source = "lox24",
                name,
                outcome = "ignored",
                "webhook for an event suppressd does not act on"
            );
            Ok(Handled {
                outcome: "ignored",
                body: json!({"status": "ignored", "name": name}),
            })
        }
        lox24::Delivery::Unsubscribe { event, warnings } => {
            let event_id = event.event_id.clone();
            let outcome = outcome_of(&state.commit(vec![event]).await?);
            log_absent_fields("lox24", outcome, &warnings);
            tracing::info!(source = "lox24", event_id, outcome, "webhook processed");
            Ok(Handled {
                outcome,
                body: json!({"status": outcome, "id": event_id}),
            })
        }
    }
}

/// Tencent's response shape, for errors too: `{"ActionStatus":"FAIL","ErrorCode":…,"ErrorInfo":…}`.
fn tencent_error(error: HttpError) -> Response {
    let status = error.status();
    let body = json!({
        "ActionStatus": "FAIL",
        "ErrorCode": status.as_u16(),
        "ErrorInfo": error.to_string(),
    });
    let mut response = json_response(status, &body);
    error.decorate(&mut response);
    response
}

fn tencent_ok(info: String) -> serde_json::Value {
    json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": info})
}

async fn tencent_delivery(
    state: &AppState,
    request: Request,
    peer: IpAddr,
) -> Result<Handled, HttpError> {
    let Some(config) = &state.webhooks.tencent else {
        return Err(HttpError::NotFound);
    };
    if request.method() != Method::POST {
        return Err(refuse(request, HttpError::MethodNotAllowed { allow: "POST" }).await);
    }
    if let Err(error) = auth_budget(state, peer) {
        return Err(refuse(request, error).await);
    }
    let query = request.uri().query();
    let param = |name| query_param(query, name).map(|v| v.into_owned());
    let params = tencent::UrlParams {
        sdkappid: param("SdkAppid"),
        command: param("CallbackCommand"),
        sign: param("Sign"),
        request_time: param("RequestTime"),
    };
    if let Err((failure, why)) = tencent::check_request(config, &params, ms_to_secs(now_ms())) {
        let error = match failure {
            AuthFailure::Missing => HttpError::Unauthorized(why),
            AuthFailure::Wrong => HttpError::Forbidden(why),
        };
        record_auth_failure(state, peer);
        return Err(refuse(request, error).await);
    }
    let body = read_body(request, MAX_BODY).await?;
    match tencent::parse(&body, params.command.as_deref(), now_ms())? {
        tencent::Delivery::Ignored { command } => {
            state.metrics.ignored("tencent", "other_callback_command");
            tracing::info!(
                source = "tencent",
                command,
                outcome = "ignored",
                "callback suppressd does not act on"
            );
            Ok(Handled {
                outcome: "ignored",
                body: tencent_ok(String::new()),
            })
        }
        tencent::Delivery::Unsubscribe {
            events,
            skipped,
            warnings,
        } => {
            let skipped_info = tencent::describe_skipped(&skipped);
            for entry in &skipped {
                state.metrics.skipped("tencent", entry.reason);
            }
            if !skipped.is_empty() {
                tracing::warn!(source = "tencent", "entries skipped: {skipped_info}");
            }
            let count = events.len();
            let outcome = outcome_of(&state.commit(events).await?);
            log_absent_fields("tencent", outcome, &warnings);
            tracing::info!(
                source = "tencent",
                accounts = count,
                skipped = skipped.len(),
                outcome,
                "webhook processed"
            );
            Ok(Handled {
                outcome,
                body: tencent_ok(skipped_info),
            })
        }
    }
}

async fn sendios_delivery(
    state: &AppState,
    request: Request,
    peer: IpAddr,
) -> Result<Handled, HttpError> {
    let Some(secret) = &state.webhooks.sendios else {
        return Err(HttpError::NotFound);
    };
    let body = authenticated_body(state, peer, secret, request).await?;
    let batch = sendios::parse(&body, now_ms())?;
    for entry in &batch.skipped {
        state.metrics.skipped("sendios", &entry.reason);
        tracing::warn!(
            source = "sendios",
            key = entry.key,
            "entry skipped: {}",
            entry.reason
        );
    }
    for entry in &batch.ignored {
        state.metrics.ignored("sendios", "unknown_event");
        tracing::info!(
            source = "sendios",
            key = entry.key,
            event = entry.event,
            "event suppressd does not act on"
        );
    }
    let outcomes = if batch.events.is_empty() {
        Vec::new()
    } else {
        state.commit(batch.events).await?
    };
    let duplicates = outcomes
        .iter()
        .filter(|o| **o == Outcome::Duplicate)
        .count();
    let outcome = if outcomes.is_empty() {
        "ignored"
    } else {
        outcome_of(&outcomes)
    };
    log_absent_fields("sendios", outcome, &batch.warnings);
    tracing::info!(
        source = "sendios",
        events = outcomes.len(),
        duplicates,
        skipped = batch.skipped.len(),
        outcome,
        "webhook processed"
    );
    Ok(Handled {
        outcome,
        body: json!({
            "status": outcome,
            "accepted": outcomes.len() - duplicates,
            "duplicates": duplicates,
            "ignored": batch.ignored,
            "skipped": batch.skipped,
        }),
    })
}
