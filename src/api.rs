//! The local API (plain HTTP on `--api-listen`): "is this number suppressed?", one at a time or
//! in bulk, a subject's history, health and metrics.
//!
//! `/healthz` and `/metrics` are open; every `/v1/...` request needs a Bearer token when
//! `--api-token-file` is configured.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::auth::DEFAULT_ACTOR;
use crate::error::HttpError;
use crate::event::{ms_to_secs, now_ms, Event, Kind, Source, Subject, MAX_ID_BYTES};
use crate::server::AppState;
use crate::store::record::{decode_status, reasons_json};
use crate::store::{ListFilter, Reason, Record, Status, StoreError, StoredEvent, SubjectKind};
use crate::web::{
    bytes_response, discard_body, json_response, media_type, path_segment, query_param, read_body,
    ChannelBody, Line, LineReader, Request, Response,
};

/// Most entries one `POST /v1/check` may carry.
pub const MAX_CHECK_ENTRIES: usize = 10_000;
/// A check request of 10,000 long entries stays well below this.
const MAX_CHECK_BODY: usize = 4 * 1024 * 1024;

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
}

/// A subject as it appears in a path, still percent-encoded.
enum SubjectPath<'a> {
    Phone(&'a str),
    Account(&'a str, &'a str),
}

impl<'a> Endpoint<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match segments.as_slice() {
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
    let path = request.uri().path().to_owned();
    let endpoint = Endpoint::parse(&path);
    let mut actor = DEFAULT_ACTOR.to_owned();
    let refusal = match &endpoint {
        None => Some(HttpError::NotFound),
        Some(endpoint) if !endpoint.allows(request.method()) => Some(HttpError::MethodNotAllowed {
            allow: endpoint.allow(),
        }),
        Some(endpoint) => match (&state.api_tokens, endpoint.needs_token()) {
            (Some(tokens), true) => match tokens.authenticate(request.headers()) {
                Ok(name) => {
                    name.clone_into(&mut actor);
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
        Some(Endpoint::Health) if state.store.is_open() => {
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
        }
        Some(Endpoint::Health) => Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unavailable", "error": "the database is closed after a storage failure; it is reopened once the data directory takes writes again"}),
        )),
        Some(Endpoint::Metrics) => {
            let text = state.metrics.render(
                state.store.size_on_disk().ok(),
                state.store.suppressed_counts(),
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
            manual_change(state, subject, Kind::Suppress, change, actor).await?;
            subject_record(state, &path)
        }
        Some(Endpoint::Record(path)) if request.method() == Method::DELETE => {
            let subject = subject(state, &path)?;
            let note = query_param(request.uri().query(), "note").map(|n| n.into_owned());
            let mut change = read_change(request).await?;
            change.note = change.note.or(note).filter(|n| !n.trim().is_empty());
            lift(state, subject, change, actor).await?;
            subject_record(state, &path)
        }
        Some(Endpoint::Record(path)) => subject_record(state, &path),
        Some(Endpoint::History(path)) => subject_history(state, &path),
        Some(Endpoint::Check) => match StreamFormat::of(&request) {
            Some(format) => Ok(check_stream(state.clone(), request, format)),
            None => check(state, request).await,
        },
        Some(Endpoint::Suppressions) => list(state, request.uri().query()),
        Some(Endpoint::Export) => crate::transfer::export(state).await,
        Some(Endpoint::Import) => crate::transfer::import(state, request).await,
    }
}

/// Default and largest page of `GET /v1/suppressions`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 10_000;

/// `GET /v1/suppressions?type=phone|account&suppressed=true|false&since=SECS&limit=N&cursor=C`
fn list(state: &AppState, query: Option<&str>) -> Result<Response, HttpError> {
    let param = |name| query_param(query, name).filter(|v| !v.is_empty());
    let kind = match param("type").as_deref() {
        None => None,
        Some("phone") => Some(SubjectKind::Phone),
        Some("account") => Some(SubjectKind::Account),
        Some(other) => {
            return Err(HttpError::bad_field(
                "type",
                format!("type must be phone or account, not {other:?}"),
            ))
        }
    };
    let suppressed = match param("suppressed").as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(HttpError::bad_field(
                "suppressed",
                format!("suppressed must be true or false, not {other:?}"),
            ))
        }
    };
    let since = match param("since") {
        None => None,
        Some(secs) => Some(
            secs.parse::<i64>()
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| HttpError::bad_field("since", "since must be Unix seconds"))?,
        ),
    };
    let limit = match param("limit") {
        None => DEFAULT_PAGE,
        Some(limit) => match limit.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(HttpError::bad_field(
                    "limit",
                    format!("limit must be 1 to {MAX_PAGE}"),
                ))
            }
        },
    };
    let cursor = match param("cursor") {
        None => None,
        Some(cursor) => Some(decode_hex(&cursor).ok_or_else(|| {
            HttpError::bad_field("cursor", "cursor is not one this API returned")
        })?),
    };
    let filter = ListFilter {
        kind,
        suppressed,
        changed_since_ms: since,
    };
    let page = state.store.list(&filter, cursor.as_deref(), limit)?;
    let items: Vec<ListItem<'_>> = page
        .items
        .iter()
        .map(|(subject, record)| ListItem {
            subject,
            suppressed: record.suppressed(),
            since: record.since_ms().map(ms_to_secs),
            reasons: &record.reasons,
        })
        .collect();
    let next_cursor = page
        .next_cursor
        .map(|key| key.iter().map(|b| format!("{b:02x}")).collect::<String>());
    Ok(json_response(
        StatusCode::OK,
        &json!({ "items": items, "next_cursor": next_cursor }),
    ))
}

#[derive(Serialize)]
struct ListItem<'a> {
    #[serde(flatten)]
    subject: &'a Subject,
    suppressed: bool,
    since: Option<i64>,
    reasons: &'a [Reason],
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
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
fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8], expected: &str) -> Result<T, HttpError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(body)
            .map_err(|e| HttpError::bad_request(format!("{expected}: {e}"))),
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
    let id = uuid::Uuid::new_v4().to_string();
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
        idempotency_key: format!("manual:{id}"),
        event_id: Some(id),
        event_time_ms: now,
        receive_time_ms: now,
        details,
    };
    state.store.commit(vec![event]).await?;
    Ok(())
}

/// Lifts a suppression. A person's own opt-out is not an operator's to overrule silently, so a
/// lift over a provider unsubscribe needs a note with the evidence of renewed consent.
async fn lift(
    state: &AppState,
    subject: Subject,
    change: Change,
    actor: String,
) -> Result<(), HttpError> {
    let Some(bytes) = state.store.record_bytes(&subject)? else {
        return Ok(());
    };
    let record = Record::decode(&bytes).map_err(StoreError::from)?;
    if !record.suppressed() {
        return Ok(());
    }
    if record.lift_needs_note() && change.note.is_none() {
        return Err(HttpError::bad_field(
            "note",
            "this suppression includes the person's own unsubscribe; lifting it needs a note with the evidence of renewed consent",
        ));
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
    // Most numbers looked up are not suppressed: the in-memory index answers those without
    // touching the database (a record that is not suppressed has no reasons to show).
    let bytes = match &subject {
        Subject::Phone { phone } if !state.store.phone_status(phone)?.suppressed => None,
        _ => state.store.record_bytes(&subject)?,
    };
    state.metrics.lookups(false, 1);
    let (status, reasons) = match &bytes {
        Some(bytes) => (
            decode_status(bytes).map_err(StoreError::from)?,
            Some(reasons_json(bytes).map_err(StoreError::from)?),
        ),
        None => (Status::default(), None),
    };
    let empty = RawValue::from_string("[]".to_owned())
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    let view = RecordView {
        subject: &subject,
        suppressed: status.suppressed,
        since: status.since_ms.map(ms_to_secs),
        reasons: reasons.unwrap_or(&empty),
    };
    Ok(json_response(StatusCode::OK, &view))
}

/// The public shape of a record; a subject never seen is simply not suppressed.
#[derive(Serialize)]
struct RecordView<'a> {
    #[serde(flatten)]
    subject: &'a Subject,
    suppressed: bool,
    since: Option<i64>,
    reasons: &'a RawValue,
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

#[derive(Deserialize)]
struct CheckRequest<'a> {
    #[serde(borrow, default)]
    phones: Vec<CheckEntry<'a>>,
    #[serde(default)]
    accounts: Vec<Value>,
}

/// One entry of a check list: a string to look up, or anything else, which gets an error of its
/// own instead of failing the whole request.
enum CheckEntry<'a> {
    Text(Cow<'a, str>),
    Other(Value),
}

impl<'de: 'a, 'a> Deserialize<'de> for CheckEntry<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = CheckEntry<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a phone number string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CheckEntry::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CheckEntry::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(CheckEntry::Other(json!(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(CheckEntry::Other(json!(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(CheckEntry::Other(json!(v)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(CheckEntry::Other(json!(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(CheckEntry::Other(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(CheckEntry::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(CheckEntry::Other)
            }
        }
        deserializer.deserialize_any(EntryVisitor)
    }
}

#[derive(Serialize)]
struct CheckResponse<'a> {
    results: Vec<CheckResult<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum CheckResult<'a> {
    Found {
        input: &'a str,
        phone: Cow<'a, str>,
        suppressed: bool,
        since: Option<i64>,
    },
    Invalid {
        input: &'a Value,
        error: String,
    },
    InvalidText {
        input: &'a str,
        error: String,
    },
    Account {
        input: &'a Value,
        scope: &'a str,
        account: &'a str,
        suppressed: bool,
        since: Option<i64>,
    },
}

async fn check(state: &AppState, request: Request) -> Result<Response, HttpError> {
    let body = read_body(request, MAX_CHECK_BODY).await?;
    let parsed: CheckRequest<'_> = parse_object(&body, "body must be {\"phones\": [\"...\"]}")?;
    let entries = parsed.phones.len() + parsed.accounts.len();
    if entries > MAX_CHECK_ENTRIES {
        let field = if parsed.accounts.is_empty() {
            "phones"
        } else {
            "accounts"
        };
        return Err(HttpError::bad_field(
            field,
            format!("at most {MAX_CHECK_ENTRIES} entries per request, got {entries}"),
        ));
    }
    let mut results = Vec::with_capacity(parsed.phones.len());
    for entry in &parsed.phones {
        results.push(match entry {
            CheckEntry::Text(input) => match state.phones.normalize_borrowed(input) {
                Ok(phone) => {
                    let status = state.store.phone_status(&phone)?;
                    CheckResult::Found {
                        input,
                        phone,
                        suppressed: status.suppressed,
                        since: status.since_ms.map(ms_to_secs),
                    }
                }
                Err(e) => CheckResult::InvalidText {
                    input,
                    error: e.to_string(),
                },
            },
            CheckEntry::Other(input) => CheckResult::Invalid {
                input,
                error: "entry must be a phone number string".into(),
            },
        });
    }
    for input in &parsed.accounts {
        let scope = input.get("scope").and_then(Value::as_str);
        let account = input.get("account").and_then(Value::as_str);
        results.push(match (scope, account) {
            (Some(scope), Some(account))
                if (1..=MAX_ID_BYTES).contains(&scope.len())
                    && (1..=MAX_ID_BYTES).contains(&account.len()) =>
            {
                let status = state.store.status(&Subject::Account {
                    scope: scope.to_owned(),
                    account: account.to_owned(),
                })?;
                CheckResult::Account {
                    input,
                    scope,
                    account,
                    suppressed: status.suppressed,
                    since: status.since_ms.map(ms_to_secs),
                }
            }
            _ => CheckResult::Invalid {
                input,
                error:
                    "entry must be {\"scope\": \"…\", \"account\": \"…\"} with non-empty strings"
                        .into(),
            },
        });
    }
    state.metrics.lookups(true, results.len() as u64);
    Ok(json_response(StatusCode::OK, &CheckResponse { results }))
}

/// The line formats a streamed bulk check accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamFormat {
    /// One phone number per line.
    Text,
    /// One JSON value per line: a phone string, `{"phone": …}` or `{"scope": …, "account": …}`.
    Ndjson,
}

impl StreamFormat {
    fn of(request: &Request) -> Option<Self> {
        match media_type(request)?.as_str() {
            "text/plain" | "text/csv" => Some(StreamFormat::Text),
            "application/x-ndjson" | "application/ndjson" => Some(StreamFormat::Ndjson),
            _ => None,
        }
    }
}

/// A line longer than this is answered with an error instead of being buffered further.
const MAX_LINE: usize = 64 * 1024;
/// Output is sent in chunks of about this size; with the bounded channel, memory stays
/// constant however long the list is.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// `POST /v1/check` with a text or NDJSON body: results stream back as NDJSON, one line per
/// input line (blank lines skipped), in input order, while the input is still arriving.
fn check_stream(state: Arc<AppState>, request: Request, format: StreamFormat) -> Response {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut lines = LineReader::new(request, MAX_LINE);
        let mut output: Vec<u8> = Vec::with_capacity(OUTPUT_CHUNK + 1024);
        let mut checked = 0u64;
        while let Some(line) = lines.next_line().await {
            match line {
                Ok(Line::Text(line)) => checked += check_line(&state, &line, format, &mut output),
                Ok(Line::TooLong) => write_line(
                    &mut output,
                    &json!({"input": null, "error": format!("line longer than {MAX_LINE} bytes")}),
                ),
                Err(_) => return,
            }
            if output.len() >= OUTPUT_CHUNK
                && sender
                    .send(Bytes::from(std::mem::take(&mut output)))
                    .await
                    .is_err()
            {
                return;
            }
        }
        state.metrics.lookups(true, checked);
        if !output.is_empty() {
            let _ = sender.send(Bytes::from(output)).await;
        }
    });
    ndjson_response(receiver)
}

/// A streamed NDJSON response fed by `receiver`.
pub fn ndjson_response(receiver: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let mut response = hyper::Response::new(ChannelBody(receiver).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Checks one input line, appending its result line; returns how many subjects were checked.
fn check_line(state: &AppState, line: &[u8], format: StreamFormat, output: &mut Vec<u8>) -> u64 {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return 0;
    }
    let result = match format {
        StreamFormat::Text => check_phone_value(state, json!(text), text),
        StreamFormat::Ndjson => match serde_json::from_str::<Value>(text) {
            Ok(Value::String(phone)) => check_phone_value(state, json!(phone), &phone),
            Ok(Value::Object(object)) => match (
                object.get("phone"),
                object.get("scope"),
                object.get("account"),
            ) {
                (Some(Value::String(phone)), _, _) => {
                    let phone = phone.clone();
                    check_phone_value(state, Value::Object(object), &phone)
                }
                (None, Some(Value::String(scope)), Some(Value::String(account)))
                    if (1..=MAX_ID_BYTES).contains(&scope.len())
                        && (1..=MAX_ID_BYTES).contains(&account.len()) =>
                {
                    let subject = Subject::Account {
                        scope: scope.clone(),
                        account: account.clone(),
                    };
                    match state.store.status(&subject) {
                        Ok(status) => json!({
                            "input": object, "scope": scope, "account": account,
                            "suppressed": status.suppressed, "since": status.since_ms.map(ms_to_secs),
                        }),
                        Err(e) => json!({"input": object, "error": e.to_string()}),
                    }
                }
                _ => {
                    json!({"input": object, "error": "expected {\"phone\": …} or {\"scope\": …, \"account\": …}"})
                }
            },
            Ok(other) => json!({"input": other, "error": "expected a phone string or an object"}),
            Err(e) => json!({"input": text, "error": format!("line is not JSON: {e}")}),
        },
    };
    write_line(output, &result);
    1
}

fn check_phone_value(state: &AppState, input: Value, phone: &str) -> Value {
    match state.phones.normalize_borrowed(phone) {
        Ok(e164) => match state.store.phone_status(&e164) {
            Ok(status) => json!({
                "input": input, "phone": e164,
                "suppressed": status.suppressed, "since": status.since_ms.map(ms_to_secs),
            }),
            Err(e) => json!({"input": input, "error": e.to_string()}),
        },
        Err(e) => json!({"input": input, "error": e.to_string()}),
    }
}

fn write_line(output: &mut Vec<u8>, value: &Value) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *output, value);
    output.push(b'\n');
}
