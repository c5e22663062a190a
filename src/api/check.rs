//! `POST /v1/check`: many subjects at once, as one JSON list (up to [`MAX_CHECK_ENTRIES`]) or as a
//! text or NDJSON stream of any length whose results stream back line by line.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use hyper::StatusCode;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::require_object;
use crate::error::HttpError;
use crate::event::{ms_to_secs, Subject, MAX_ID_BYTES};
use crate::response::{json_response, ndjson_response, Response};
use crate::state::AppState;
use crate::store::StoreError;
use crate::web::{read_body, Line, LineFormat, LineReader, Request};

/// Most entries one `POST /v1/check` may carry.
pub(super) const MAX_CHECK_ENTRIES: usize = 10_000;
/// A check request of 10,000 long entries stays well below this.
const MAX_CHECK_BODY: usize = 4 * 1024 * 1024;

/// A mistyped member (`phone`, `phons`) must not read as "nothing to check, nothing
/// suppressed", so unknown members are refused and at least one of the two lists must be there.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest<'a> {
    #[serde(borrow, default, deserialize_with = "phones_list")]
    phones: Option<Vec<CheckEntry<'a>>>,
    #[serde(default, deserialize_with = "accounts_list")]
    accounts: Option<Vec<Value>>,
}

const CHECK_BODY_SHAPE: &str = "body must be {\"phones\": [\"...\"]} or {\"accounts\": [...]}";
const LIST_MEMBERS: [&str; 2] = ["phones", "accounts"];

fn phones_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<CheckEntry<'de>>>, D::Error> {
    present_list(deserializer, "phones")
}

fn accounts_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<Value>>, D::Error> {
    present_list(deserializer, "accounts")
}

/// A member that is present must be a list: `"accounts": null` is as likely a client's bug as a
/// misspelt member, so it is refused rather than read as "no accounts".
fn present_list<'de, D, T>(deserializer: D, member: &str) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Vec::deserialize(deserializer)
        .map(Some)
        .map_err(|error| de::Error::custom(format!("`{member}` must be a list: {error}")))
}

/// Parses a JSON check body; an unknown member, or a member that is not a list, is a 400 that
/// names it.
fn parse_check_request(body: &[u8]) -> Result<(Vec<CheckEntry<'_>>, Vec<Value>), HttpError> {
    require_object(body, CHECK_BODY_SHAPE)?;
    let parsed: CheckRequest<'_> = serde_json::from_slice(body).map_err(|error| {
        let message = error.to_string();
        if let Some(member) = unknown_member(&message) {
            return HttpError::bad_field(
                &member,
                format!("unknown member `{member}`; {CHECK_BODY_SHAPE}"),
            );
        }
        match LIST_MEMBERS
            .iter()
            .find(|member| message.starts_with(&format!("`{member}`")))
        {
            Some(member) => HttpError::bad_field(member, format!("{message}; {CHECK_BODY_SHAPE}")),
            None => HttpError::bad_request(format!("{CHECK_BODY_SHAPE}: {message}")),
        }
    })?;
    match (parsed.phones, parsed.accounts) {
        (None, None) => Err(HttpError::bad_field(
            "phones",
            format!("neither `phones` nor `accounts` is present; {CHECK_BODY_SHAPE}"),
        )),
        (phones, accounts) => Ok((phones.unwrap_or_default(), accounts.unwrap_or_default())),
    }
}

/// The member serde's `deny_unknown_fields` error names ("unknown field `phons`, expected …").
fn unknown_member(message: &str) -> Option<String> {
    let rest = &message[message.find("unknown field `")? + "unknown field `".len()..];
    Some(rest[..rest.find('`')?].to_owned())
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

pub(super) async fn check(state: &AppState, request: Request) -> Result<Response, HttpError> {
    let body = read_body(request, MAX_CHECK_BODY).await?;
    let (phones, accounts) = parse_check_request(&body)?;
    let entries = phones.len() + accounts.len();
    if entries > MAX_CHECK_ENTRIES {
        let field = if accounts.is_empty() {
            "phones"
        } else {
            "accounts"
        };
        return Err(HttpError::bad_field(
            field,
            format!("at most {MAX_CHECK_ENTRIES} entries per request, got {entries}"),
        ));
    }
    let mut results = Vec::with_capacity(entries);
    for entry in &phones {
        results.push(match entry {
            CheckEntry::Text(input) => phone_result(state, input)?,
            CheckEntry::Other(input) => CheckResult::Invalid {
                input,
                error: "entry must be a phone number string".into(),
            },
        });
    }
    for input in &accounts {
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

/// A line longer than this is answered with an error instead of being buffered further.
const MAX_LINE: usize = 64 * 1024;
/// Output is sent in chunks of about this size; with the bounded channel, memory stays
/// constant however long the list is.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// `POST /v1/check` with a text or NDJSON body: results stream back as NDJSON, one line per
/// input line (blank lines skipped), in input order, while the input is still arriving.
pub(super) fn check_stream(state: Arc<AppState>, request: Request, format: LineFormat) -> Response {
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

/// Checks one input line, appending its result line; returns how many subjects were checked.
fn check_line(state: &AppState, line: &[u8], format: LineFormat, output: &mut Vec<u8>) -> u64 {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return 0;
    }
    let result = match format {
        LineFormat::Text | LineFormat::Csv => {
            // The common case at campaign scale: written straight from the lookup, without
            // building a JSON value first (which cost a third of a streamed check).
            // A streamed check reports a store failure on the line it hit.
            let result = phone_result(state, text).unwrap_or_else(|e| CheckResult::InvalidText {
                input: text,
                error: e.to_string(),
            });
            write_line(output, &result);
            return 1;
        }
        LineFormat::Ndjson => match serde_json::from_str::<Value>(text) {
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

/// The result for one phone number given as text, as a JSON list's entry would be. A number
/// that does not parse is a result; a store that cannot answer is the caller's to report.
fn phone_result<'a>(state: &AppState, input: &'a str) -> Result<CheckResult<'a>, StoreError> {
    match state.phones.normalize_borrowed(input) {
        Ok(phone) => {
            let status = state.store.phone_status(&phone)?;
            Ok(CheckResult::Found {
                input,
                phone,
                suppressed: status.suppressed,
                since: status.since_ms.map(ms_to_secs),
            })
        }
        Err(e) => Ok(CheckResult::InvalidText {
            input,
            error: e.to_string(),
        }),
    }
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

fn write_line(output: &mut Vec<u8>, value: &impl Serialize) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *output, value);
    output.push(b'\n');
}
