//! The local API (plain HTTP on `--api-listen`): "is this number suppressed?", one at a time or
//! in bulk, a subject's history, health and metrics.
//!
//! `/healthz` and `/metrics` are open; every `/v1/...` request needs a Bearer token when
//! `--api-token-file` is configured.
//!
//! This module routes and serves single subjects (records, histories, manual changes); bulk
//! checks are in `check`, the listing of suppressions in `list`, export and import in
//! [`crate::transfer`].

mod check;
mod list;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::auth::DEFAULT_ACTOR;
use crate::cluster::Cluster;
use crate::error::HttpError;
use crate::event::{
    mint_idempotency_key, ms_to_secs, now_ms, Event, Kind, Source, Subject, MAX_ID_BYTES,
};
use crate::response::{bytes_response, json_response, Response};
use crate::state::AppState;
use crate::store::{RecordRef, Status, StoreError, StoredEvent};
use crate::web::{discard_body, path_segment, query_param, read_body, LineFormat, Request};

pub async fn handle(state: &Arc<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let response = match route(state, request).await {
        Ok(response) => response,
        Err(error) => {
            if error.status().is_server_error() {
                tracing::error!("API request failed: {error}");
            }
            error.into_response()
        }
    };
    state.metrics.api_request(started.elapsed());
    response
}

/// The endpoints of the API, recognised from the path alone.
enum Endpoint<'a> {
    Health,
    Metrics,
    Record(SubjectPath<'a>),
    History(SubjectPath<'a>),
    Check,
    Suppressions,
    Export,
    Import,
    Backup,
}

/// A subject as it appears in a path, still percent-encoded.
enum SubjectPath<'a> {
    Phone(&'a str),
    Account(&'a str, &'a str),
}

impl<'a> Endpoint<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        // No endpoint has more than five segments; a fixed array spares the lookup path an
        // allocation.
        let mut segments = [""; 5];
        let mut count = 0;
        for segment in path.trim_start_matches('/').split('/') {
            *segments.get_mut(count)? = segment;
            count += 1;
        }
        Some(match segments.get(..count)? {
            ["healthz"] => Endpoint::Health,
            ["metrics"] => Endpoint::Metrics,
            ["v1", "phones", phone] => Endpoint::Record(SubjectPath::Phone(phone)),
            ["v1", "phones", phone, "history"] => Endpoint::History(SubjectPath::Phone(phone)),
            ["v1", "accounts", scope, account] => {
                Endpoint::Record(SubjectPath::Account(scope, account))
            }
            ["v1", "accounts", scope, account, "history"] => {
                Endpoint::History(SubjectPath::Account(scope, account))
            }
            ["v1", "check"] => Endpoint::Check,
            ["v1", "suppressions"] => Endpoint::Suppressions,
            ["v1", "export"] => Endpoint::Export,
            ["v1", "backup"] => Endpoint::Backup,
            ["v1", "import"] => Endpoint::Import,
            _ => return None,
        })
    }

    /// The methods the endpoint answers, as an `Allow` header (`HEAD` goes wherever `GET` does).
    fn allow(&self) -> &'static str {
        match self {
            Endpoint::Check | Endpoint::Import => "POST",
            Endpoint::Record(_) => "GET, PUT, DELETE",
            _ => "GET",
        }
    }

    fn allows(&self, method: &Method) -> bool {
        let name = if *method == Method::HEAD {
            "GET"
        } else {
            method.as_str()
        };
        self.allow().split(", ").any(|allowed| allowed == name)
    }

    /// Health and metrics stay open so that probes and scrapers need no token.
    fn needs_token(&self) -> bool {
        !matches!(self, Endpoint::Health | Endpoint::Metrics)
    }
}

/// Checks in the same order as the webhooks: 404 → 405 → 401/403, then the endpoint.
async fn route(state: &Arc<AppState>, request: Request) -> Result<Response, HttpError> {
    // A cheap clone (shared bytes) that outlives `request`, whose body the endpoint may consume.
    let uri = request.uri().clone();
    let endpoint = Endpoint::parse(uri.path());
    let mut actor = DEFAULT_ACTOR;
    let refusal = match &endpoint {
        None => Some(HttpError::NotFound),
        Some(endpoint) if !endpoint.allows(request.method()) => Some(HttpError::MethodNotAllowed {
            allow: endpoint.allow(),
        }),
        Some(endpoint) => match (&state.api_tokens, endpoint.needs_token()) {
            (Some(tokens), true) => match tokens.authenticate(request.headers()) {
                Ok(name) => {
                    actor = name;
                    None
                }
                Err(failure) => Some(HttpError::auth(failure)),
            },
            _ => None,
        },
    };
    if let Some(error) = refusal {
        discard_body(request).await;
        return Err(error);
    }
    match endpoint {
        None => Err(HttpError::NotFound),
        Some(Endpoint::Health) => Ok(health(state)),
        Some(Endpoint::Metrics) => {
            let cluster = state.cluster.as_ref().map(Cluster::status);
            let text = state.metrics.render(
                state.store.size_on_disk().ok(),
                state.store.suppressed_counts(),
                cluster,
            );
            Ok(bytes_response(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                text,
            ))
        }
        Some(Endpoint::Record(path)) if request.method() == Method::PUT => {
            let subject = subject(state, &path)?;
            let change = read_change(request).await?;
            manual_change(state, subject, Kind::Suppress, change, actor.to_owned()).await?;
            subject_record(state, &path)
        }
        Some(Endpoint::Record(path)) if request.method() == Method::DELETE => {
            let subject = subject(state, &path)?;
            let note = query_param(request.uri().query(), "note").map(|n| n.into_owned());
            let mut change = read_change(request).await?;
            change.note = change.note.or(note).filter(|n| !n.trim().is_empty());
            lift(state, subject, change, actor.to_owned()).await?;
            subject_record(state, &path)
        }
        Some(Endpoint::Record(path)) => subject_record(state, &path),
        Some(Endpoint::History(path)) => subject_history(state, &path),
        Some(Endpoint::Check) => match LineFormat::of(&request) {
            Some(format) => Ok(check::check_stream(state.clone(), request, format)),
            None => check::check(state, request).await,
        },
        Some(Endpoint::Suppressions) => list::list(state, request.uri().query()),
        Some(Endpoint::Export) => crate::transfer::export(state).await,
        Some(Endpoint::Backup) => crate::transfer::backup(state).await,
        Some(Endpoint::Import) => crate::transfer::import(state, request).await,
    }
}

/// `GET /healthz`: 200 while the store takes writes. A cluster node adds whether it reaches the
/// stream and how many accepted events wait for it; it stays 200 without the stream, since it
/// keeps answering lookups and taking deliveries.
fn health(state: &AppState) -> Response {
    let (code, mut body) = if state.store.is_open() {
        (StatusCode::OK, json!({"status": "ok"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "error": "the database is closed after a storage failure; it is reopened once the data directory takes writes again"}),
        )
    };
    if let Some(cluster) = &state.cluster {
        let status = cluster.status();
        body["cluster"] = json!(if status.connected {
            "connected"
        } else {
            "disconnected"
        });
        body["pending_events"] = json!(status.pending);
    }
    json_response(code, &body)
}

/// The optional body of PUT and DELETE.
#[derive(Debug, Default, Deserialize)]
struct Change {
    reason: Option<String>,
    note: Option<String>,
}

/// Bodies of manual changes are small; anything larger is a mistake.
const MAX_CHANGE_BODY: usize = 64 * 1024;

async fn read_change(request: Request) -> Result<Change, HttpError> {
    let body = read_body(request, MAX_CHANGE_BODY).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Change::default());
    }
    parse_object(
        &body,
        "body must be empty or {\"reason\": \"…\", \"note\": \"…\"}",
    )
}

/// Parses a JSON object body; `expected` says what it should have been. serde would read a
/// struct from a JSON array too (`[reason, note]`), so anything but an object is refused first.
pub(crate) fn parse_object<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    expected: &str,
) -> Result<T, HttpError> {
    require_object(body, expected)?;
    serde_json::from_slice(body).map_err(|e| HttpError::bad_request(format!("{expected}: {e}")))
}

/// Refuses a body that is not a JSON object before serde, which reads structs from arrays too.
pub(crate) fn require_object(body: &[u8], expected: &str) -> Result<(), HttpError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err(HttpError::bad_request(format!(
            "{expected}: not a JSON object"
        ))),
    }
}

/// Records an operator's change as an event at the current time, kept in the history with who
/// made it.
async fn manual_change(
    state: &AppState,
    subject: Subject,
    kind: Kind,
    change: Change,
    actor: String,
) -> Result<(), HttpError> {
    let (id, idempotency_key) = mint_idempotency_key(Source::Manual);
    let now = now_ms();
    tracing::info!(source = "manual", kind = ?kind, actor, "manual change");
    let mut details = serde_json::Map::new();
    details.insert("actor".into(), json!(actor));
    if let Some(reason) = change.reason {
        details.insert("reason".into(), json!(reason));
    }
    if let Some(note) = change.note {
        details.insert("note".into(), json!(note));
    }
    let event = Event {
        subject,
        source: Source::Manual,
        kind,
        idempotency_key,
        event_id: Some(id),
        event_time_ms: now,
        receive_time_ms: now,
        details,
    };
    state.commit(vec![event]).await?;
    Ok(())
}

/// Lifts a suppression. A person's own opt-out is not an operator's to overrule silently: the
/// store refuses a lift over a provider unsubscribe without a note (`Record::refuses`), judged
/// in the committer so that an unsubscribe arriving meanwhile is not lifted unnoticed.
async fn lift(
    state: &AppState,
    subject: Subject,
    change: Change,
    actor: String,
) -> Result<(), HttpError> {
    if !state.store.status(&subject)?.suppressed {
        return Ok(());
    }
    manual_change(state, subject, Kind::Lift, change, actor).await
}

fn subject(state: &AppState, path: &SubjectPath<'_>) -> Result<Subject, HttpError> {
    match path {
        SubjectPath::Phone(segment) => {
            let raw = path_segment(segment)?;
            let phone = state
                .phones
                .normalize(&raw)
                .map_err(|e| HttpError::bad_field("phone", e.to_string()))?;
            Ok(Subject::Phone { phone })
        }
        SubjectPath::Account(scope, account) => Ok(Subject::Account {
            scope: account_id("scope", &path_segment(scope)?)?,
            account: account_id("account", &path_segment(account)?)?,
        }),
    }
}

fn account_id(field: &str, value: &str) -> Result<String, HttpError> {
    if value.is_empty() || value.len() > MAX_ID_BYTES {
        return Err(HttpError::bad_field(
            field,
            format!("{field} must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    Ok(value.to_owned())
}

fn subject_record(state: &AppState, path: &SubjectPath<'_>) -> Result<Response, HttpError> {
    let subject = subject(state, path)?;
    // Kept in the lookup cache until the record changes, so without spare capacity.
    let body = state.store.rendered_record(&subject, |record| {
        Ok(Bytes::from(
            record_json(&subject, record)?.into_boxed_slice(),
        ))
    })?;
    state.metrics.lookups(false, 1);
    Ok(bytes_response(StatusCode::OK, "application/json", body))
}

/// A subject's record as the API shows it; a subject never seen is simply not suppressed.
fn record_json(subject: &Subject, record: Option<&RecordRef>) -> Result<Vec<u8>, StoreError> {
    let (status, reasons) = match record {
        Some(record) => (record.status()?, Some(record.reasons_json()?)),
        None => (Status::default(), None),
    };
    let view = RecordView {
        subject,
        suppressed: status.suppressed,
        since: status.since_ms.map(ms_to_secs),
        reasons,
    };
    let mut body = Vec::with_capacity(RECORD_JSON_BYTES + reasons.map_or(0, |r| r.get().len()));
    // Writing an in-memory value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, &view);
    Ok(body)
}

/// The length of a record's JSON without its reasons, at most (a 15-digit phone).
const RECORD_JSON_BYTES: usize = 80;

/// The public shape of a record.
#[derive(Serialize)]
struct RecordView<'a> {
    #[serde(flatten)]
    subject: &'a Subject,
    suppressed: bool,
    since: Option<i64>,
    #[serde(serialize_with = "reasons_or_none")]
    reasons: Option<&'a RawValue>,
}

fn reasons_or_none<S: serde::Serializer>(
    reasons: &Option<&RawValue>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match reasons {
        Some(reasons) => reasons.serialize(serializer),
        None => serializer.collect_seq(std::iter::empty::<()>()),
    }
}

fn subject_history(state: &AppState, path: &SubjectPath<'_>) -> Result<Response, HttpError> {
    let subject = subject(state, path)?;
    let events = state.store.history(&subject)?;
    let mut body = subject_fields(&subject);
    body["events"] = Value::Array(events.iter().map(history_view).collect());
    Ok(json_response(StatusCode::OK, &body))
}

fn subject_fields(subject: &Subject) -> Value {
    match subject {
        Subject::Phone { phone } => json!({ "phone": phone }),
        Subject::Account { scope, account } => json!({ "scope": scope, "account": account }),
    }
}

fn history_view(stored: &StoredEvent) -> Value {
    let event = &stored.event;
    json!({
        "source": event.source,
        "kind": event.kind,
        "event_id": event.event_id,
        "event_time": ms_to_secs(event.event_time_ms),
        "event_time_ms": event.event_time_ms,
        "receive_time": ms_to_secs(event.receive_time_ms),
        "receive_time_ms": event.receive_time_ms,
        "applied": stored.applied,
        "details": event.details,
    })
}
