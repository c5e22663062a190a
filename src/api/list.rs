//! `GET /v1/suppressions`: every subject, filtered and paged by a cursor that is the next key.

use hyper::StatusCode;
use serde::Serialize;
use serde_json::json;

use crate::error::HttpError;
use crate::event::{ms_to_secs, Subject};
use crate::response::{json_response, Response};
use crate::state::AppState;
use crate::store::{ListFilter, Reason, SubjectKind};
use crate::web::query_param;

/// Default and largest page of `GET /v1/suppressions`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 10_000;

/// `GET /v1/suppressions?type=phone|account&suppressed=true|false&since=SECS&limit=N&cursor=C`
pub(super) fn list(state: &AppState, query: Option<&str>) -> Result<Response, HttpError> {
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
