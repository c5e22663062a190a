//! Sendios omnichannel SMS webhooks: `sms_sent`, `sms_lost`, `sms_click`.
//!
//! What happens when Sendios calls us:
//! 1. `POST /webhooks/sendios`, authenticated like LOX24 (Bearer, Basic password or `token=`;
//!    401 none / 403 wrong), at most 1 MiB.
//! 2. [`parse`] (this module) reads the body as a batch: an object of events keyed "0", "1", …
//!    (Sendios puts a `"sign"` string beside them, which is not an event), a JSON array of
//!    events, or one event object. An entry without `event`, `client_user_id` or `project_id`
//!    cannot identify its subject and is skipped — named in the response with the reason — so
//!    that one broken entry never loses the others. Unknown event names are acknowledged and
//!    ignored. A body with no usable entry is 400.
//! 3. Each event concerns the account `client_user_id` in scope `sendios:{project_id}`:
//!    `sms_lost` counts towards `--sendios-lost-threshold` consecutive losses, which suppress the
//!    account as `undeliverable`; `sms_click` resets the count and lifts `undeliverable`;
//!    `sms_sent` is history only. The batch is committed atomically and made durable before 200.
//!    Redeliveries are recognised per (`project_id`, `sms_id`, `event`).

use serde_json::{Map, Value};

use super::{parse_json, seconds_as_ms, Details, Expect, PayloadError};
use crate::event::{Event, Kind, Source, Subject, MAX_ID_BYTES};

/// An entry that could not be used, by its key in the batch ("0", "1", … or the array index).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

/// An entry with an event name suppressd does not act on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ignored {
    pub key: String,
    pub event: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub events: Vec<Event>,
    pub ignored: Vec<Ignored>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
}

/// Parses a Sendios webhook body received at `receive_time_ms`.
pub fn parse(body: &[u8], receive_time_ms: i64) -> Result<Batch, PayloadError> {
    let json = parse_json(body)?;
    let entries: Vec<(String, &Value)> = match &json {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        Value::Object(object) if object.contains_key("event") => vec![("0".to_owned(), &json)],
        // Members that are not objects (Sendios' "sign") are not events at all.
        Value::Object(object) => object
            .iter()
            .filter(|(_, value)| value.is_object())
            .map(|(key, value)| (key.clone(), value))
            .collect(),
        _ => {
            return Err(PayloadError::body(
                "body must be a JSON object or array of Sendios events",
            ))
        }
    };
    super::check_batch_len("body", entries.len())?;
    let mut batch = Batch {
        events: Vec::new(),
        ignored: Vec::new(),
        skipped: Vec::new(),
        warnings: Vec::new(),
    };
    for (key, value) in entries {
        match entry(&key, value, receive_time_ms, &mut batch.warnings) {
            Ok(Entry::Event(event)) => batch.events.push(*event),
            Ok(Entry::Ignored(event)) => batch.ignored.push(Ignored { key, event }),
            Err(reason) => batch.skipped.push(Skipped { key, reason }),
        }
    }
    if batch.events.is_empty() && batch.ignored.is_empty() {
        return Err(PayloadError::body(if batch.skipped.is_empty() {
            "body holds no Sendios event".to_owned()
        } else {
            let reasons: Vec<_> = batch
                .skipped
                .iter()
                .map(|s| format!("{}: {}", s.key, s.reason))
                .collect();
            format!("no usable Sendios event ({})", reasons.join("; "))
        }));
    }
    Ok(batch)
}

enum Entry {
    Event(Box<Event>),
    Ignored(String),
}

fn entry(
    key: &str,
    value: &Value,
    receive_time_ms: i64,
    warnings: &mut Vec<String>,
) -> Result<Entry, String> {
    let object = value.as_object().ok_or("entry is not an object")?;
    let name = match object.get("event") {
        Some(Value::String(name)) => name,
        Some(_) => return Err("event is not a string".into()),
        None => return Err("event is missing".into()),
    };
    let account = match object.get("client_user_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_ID_BYTES => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        Some(Value::String(id)) if !id.is_empty() => {
            return Err("client_user_id is too long".into())
        }
        Some(_) => return Err("client_user_id is not a non-empty string".into()),
        None => return Err("client_user_id is missing".into()),
    };
    let project = match object.get("project_id") {
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.trim_start_matches('0').to_owned()
        }
        Some(_) => return Err("project_id is not a number".into()),
        None => return Err("project_id is missing".into()),
    };
    let project = if project.is_empty() {
        "0".to_owned()
    } else {
        project
    };
    let kind = match name.as_str() {
        "sms_sent" => Kind::SmsSent,
        "sms_lost" => Kind::SmsLost,
        "sms_click" => Kind::SmsClick,
        _ => return Ok(Entry::Ignored(name.clone())),
    };
    let sms_id = match object.get("sms_id") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let path = format!("{key}.ts");
    let event_time_ms = seconds_as_ms(object, "ts", &path, warnings).unwrap_or_else(|| {
        warnings.push(format!(
            "{key}: no ts; the receive time is used as the event time"
        ));
        receive_time_ms
    });
    let idempotency_key = match &sms_id {
        Some(sms_id) => format!("sendios:{project}:{sms_id}:{name}"),
        // serde_json's maps are sorted, so this serialisation is canonical.
        None => format!(
            "sendios:sha256:{}",
            crate::secret::sha256_hex(value.to_string().as_bytes())
        ),
    };
    let mut details = Details::new(object, key);
    details.take("category_id", "category_id", Expect::Integer, false);
    details.take("template_id", "template_id", Expect::Integer, false);
    details.take("omnichannel", "omnichannel", Expect::Integer, false);
    details.take("channel", "channel", Expect::String, false);
    details.take("link", "link", Expect::String, false);
    warnings.append(&mut details.warnings);
    let mut details: Map<String, Value> = details.details;
    if let Some(sms_id) = &sms_id {
        details.insert("sms_id".into(), Value::String(sms_id.clone()));
    }
    Ok(Entry::Event(Box::new(Event {
        subject: Subject::Account {
            scope: format!("sendios:{project}"),
            account,
        },
        source: Source::Sendios,
        kind,
        idempotency_key,
        event_id: sms_id,
        event_time_ms,
        receive_time_ms,
        details,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `sms_lost` example from the Sendios page with its JSON typos (missing quote, extra
    /// brace) repaired.
    const LOST_EXAMPLE: &str = r#"{
  "0": {
    "event": "sms_lost",
    "client_user_id": "test123",
    "project_id": 99,
    "category_id": 1,
    "template_id": 15,
    "sms_id": 1233,
    "ts": 1549382627,
    "omnichannel": 1,
    "channel" : "sms"
    }
}"#;

    #[test]
    fn seed_example_becomes_one_event() {
        let batch = parse(LOST_EXAMPLE.as_bytes(), 1).expect("parses");
        assert_eq!(batch.events.len(), 1);
        let event = &batch.events[0];
        assert_eq!(
            event.subject,
            Subject::Account {
                scope: "sendios:99".into(),
                account: "test123".into()
            }
        );
        assert_eq!(event.kind, Kind::SmsLost);
        assert_eq!(event.event_time_ms, 1_549_382_627_000);
        assert_eq!(event.idempotency_key, "sendios:99:1233:sms_lost");
        assert_eq!(event.details.get("template_id"), Some(&json!(15)));
    }

    #[test]
    fn batch_shapes_and_the_sign_member() {
        let one =
            json!({"event": "sms_click", "client_user_id": "u", "project_id": "099", "sms_id": 1});
        let keyed = json!({"0": one, "7": one, "sign": "abc"});
        let batch = parse(keyed.to_string().as_bytes(), 1).expect("parses");
        assert_eq!(batch.events.len(), 2);
        assert!(batch.skipped.is_empty(), "sign is not an entry");
        assert_eq!(
            batch.events[0].subject,
            Subject::Account {
                scope: "sendios:99".into(),
                account: "u".into()
            }
        );
        assert_eq!(
            parse(json!([one, one]).to_string().as_bytes(), 1)
                .expect("array")
                .events
                .len(),
            2
        );
        assert_eq!(
            parse(one.to_string().as_bytes(), 1)
                .expect("single")
                .events
                .len(),
            1
        );
    }

    #[test]
    fn unusable_entries_are_skipped_with_reasons_and_unknown_events_ignored() {
        let body = json!({
            "0": {"event": "sms_sent", "client_user_id": "u", "project_id": 1},
            "1": {"client_user_id": "u", "project_id": 1},
            "2": {"event": "sms_lost", "project_id": 1},
            "3": {"event": "sms_lost", "client_user_id": "u"},
            "4": {"event": "email_open", "client_user_id": "u", "project_id": 1},
        });
        let batch = parse(body.to_string().as_bytes(), 1).expect("parses");
        assert_eq!(batch.events.len(), 1);
        let skipped: Vec<_> = batch
            .skipped
            .iter()
            .map(|s| (s.key.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("1", "event is missing"),
                ("2", "client_user_id is missing"),
                ("3", "project_id is missing")
            ]
        );
        assert_eq!(
            batch.ignored,
            vec![Ignored {
                key: "4".into(),
                event: "email_open".into()
            }]
        );
        // Without sms_id the key is a hash of the canonical JSON: same content, same key.
        assert!(batch.events[0]
            .idempotency_key
            .starts_with("sendios:sha256:"));
    }

    #[test]
    fn no_usable_entry_is_an_error() {
        for body in [
            "{}",
            r#"{"sign": "x"}"#,
            r#"{"0": {"project_id": 1}}"#,
            "[]",
            "5",
            "nope",
        ] {
            assert!(parse(body.as_bytes(), 1).is_err(), "{body}");
        }
    }
}
