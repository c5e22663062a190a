//! The public HTTPS listener: routes provider webhooks to their parser and the store.
//!
//! Every webhook goes through the same checks, in this order, so that a caller learns the most
//! basic problem first: unknown path or provider not enabled (404) → method (405) → credential
//! (401 none / 403 wrong) → body size (413) → payload (400). The response is sent only after the
//! store has made the request's effect durable (see ARCHITECTURE.md, "no 2xx before durable").

use std::time::Instant;

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::auth::{self, Secret};
use crate::error::HttpError;
use crate::event::now_ms;
use crate::providers::lox24;
use crate::server::AppState;
use crate::store::Outcome;
use crate::web::{discard_body, json_response, query_param, read_body, Request, Response};

/// Largest accepted webhook body: 1 MiB (exactly 1,048,576 bytes is still accepted).
pub const MAX_BODY: usize = 1024 * 1024;

/// Which providers are enabled, with their credentials.
#[derive(Debug, Default, Clone)]
pub struct WebhookConfig {
    pub lox24: Option<Secret>,
}

pub async fn handle(state: &AppState, request: Request) -> Response {
    let started = Instant::now();
    match (request.uri().path(), &state.webhooks.lox24) {
        ("/webhooks/lox24", Some(secret)) => {
            let result = lox24_delivery(state, secret, request).await;
            finish(state, "lox24", started, result)
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
            error.into_response()
        }
    }
}

/// Authenticates a provider's POST and reads its body.
async fn authenticated_body(secret: &Secret, request: Request) -> Result<bytes::Bytes, HttpError> {
    let refusal = if request.method() != Method::POST {
        Some(HttpError::MethodNotAllowed { allow: "POST" })
    } else {
        let token = query_param(request.uri().query(), "token");
        auth::check_webhook_secret(secret, request.headers(), token.as_deref())
            .err()
            .map(HttpError::auth)
    };
    match refusal {
        Some(error) => {
            discard_body(request).await;
            Err(error)
        }
        None => read_body(request, MAX_BODY).await,
    }
}

async fn lox24_delivery(
    state: &AppState,
    secret: &Secret,
    request: Request,
) -> Result<Handled, HttpError> {
    let body = authenticated_body(secret, request).await?;
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
            if !warnings.is_empty() {
                tracing::warn!(
                    source = "lox24",
                    event_id,
                    "stored with fields absent: {}",
                    warnings.join("; ")
                );
            }
            let outcomes = state.store.commit(vec![event]).await?;
            let outcome = match outcomes.first() {
                Some(Outcome::Duplicate) => "duplicate",
                _ => "accepted",
            };
            tracing::info!(source = "lox24", event_id, outcome, "webhook processed");
            Ok(Handled {
                outcome,
                body: json!({"status": outcome, "id": event_id}),
            })
        }
    }
}
