//! LOX24 SMS gateway: the `phone.unsubscribe` webhook.
//!
//! What happens when LOX24 calls us:
//! 1. `POST /webhooks/lox24` arrives on the HTTPS listener; [`crate::webhooks`] checks the path
//!    (404 unless `--lox24-secret-file` is set), the method (405), the shared secret as Bearer,
//!    Basic password or `token=` query parameter (401 none / 403 wrong), and the size (413 over
//!    1 MiB).
//! 2. [`parse`] (this module) reads the envelope. A `name` other than `phone.unsubscribe` is
//!    acknowledged and ignored before anything else is checked. Otherwise only what identifies
//!    the event can fail it (400): the body must be JSON, `id` a UUID, `data.phone` a phone
//!    number. Descriptive fields that are missing or ill-typed become absent, with a warning.
//! 3. The event goes to the store's group commit; its idempotency key `lox24:{id}` makes LOX24's
//!    retries (`attempt_number` 2..4, same `id`) no-ops.
//! 4. 200 is sent only after the store has made the event durable; a store failure is 500 and
//!    LOX24 retries.

use serde_json::{Map, Value};

use super::{parse_json, seconds_as_ms, Details, Expect, PayloadError};
use crate::event::{Event, Kind, Source, Subject};
use crate::phone::Normalizer;

/// The only LOX24 event name suppressd acts on.
pub const UNSUBSCRIBE: &str = "phone.unsubscribe";

/// What a LOX24 delivery asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// A recipient unsubscribed.
    Unsubscribe {
        event: Event,
        /// Descriptive fields that were missing or ill-typed and so stored as absent.
        warnings: Vec<String>,
    },
    /// A webhook for another event name: acknowledged, not stored.
    Ignored { name: String },
}

/// Parses a LOX24 webhook body received at `receive_time_ms`.
pub fn parse(
    body: &[u8],
    phones: &Normalizer,
    receive_time_ms: i64,
) -> Result<Delivery, PayloadError> {
    let json = parse_json(body)?;
    let envelope = json.as_object().ok_or_else(|| {
        PayloadError::body("body must be a JSON object (the LOX24 webhook envelope)")
    })?;
    let name = match envelope.get("name") {
        Some(Value::String(name)) => name,
        Some(Value::Null) | None => return Err(PayloadError::field("name", "name is required")),
        Some(_) => return Err(PayloadError::field("name", "name must be a string")),
    };
    if name != UNSUBSCRIBE {
        return Ok(Delivery::Ignored { name: name.clone() });
    }
    let id = event_id(envelope)?;
    let data = match envelope.get("data") {
        Some(Value::Object(data)) => data,
        _ => {
            return Err(PayloadError::field(
                "data.phone",
                "data.phone is required (data is missing or not an object)",
            ))
        }
    };
    let phone = match data.get("phone") {
        Some(Value::String(phone)) => phones
            .normalize(phone)
            .map_err(|e| PayloadError::field("data.phone", e.to_string()))?,
        Some(Value::Null) | None => {
            return Err(PayloadError::field("data.phone", "data.phone is required"))
        }
        Some(_) => {
            return Err(PayloadError::field(
                "data.phone",
                "data.phone must be a string",
            ))
        }
    };

    let mut warnings = Vec::new();
    let event_time_ms = seconds_as_ms(data, "created_at", "data.created_at", &mut warnings)
        .or_else(|| seconds_as_ms(envelope, "created_at", "created_at", &mut warnings))
        .unwrap_or_else(|| {
            warnings.push("no created_at; the receive time is used as the event time".into());
            receive_time_ms
        });

    let mut details = describe(envelope, data, &mut warnings);
    if let Some(Value::String(raw)) = data.get("phone") {
        if *raw != phone {
            details.insert("phone_as_sent".into(), Value::String(raw.clone()));
        }
    }

    Ok(Delivery::Unsubscribe {
        event: Event {
            subject: Subject::Phone { phone },
            source: Source::Lox24,
            kind: Kind::Unsubscribe,
            idempotency_key: format!("lox24:{id}"),
            event_id: Some(id),
            event_time_ms,
            receive_time_ms,
            details,
        },
        warnings,
    })
}

/// The envelope `id`, lowercased: LOX24 documents lowercase, but case must not split one event
/// into two.
fn event_id(envelope: &Map<String, Value>) -> Result<String, PayloadError> {
    match envelope.get("id") {
        Some(Value::String(id)) => {
            let is_hyphenated = id.len() == 36;
            match uuid::Uuid::try_parse(id) {
                Ok(uuid) if is_hyphenated => Ok(uuid.hyphenated().to_string()),
                _ => Err(PayloadError::field(
                    "id",
                    format!("id {id:?} is not a UUID"),
                )),
            }
        }
        Some(Value::Null) | None => Err(PayloadError::field("id", "id is required")),
        Some(_) => Err(PayloadError::field("id", "id must be a UUID string")),
    }
}

/// The provider's descriptive fields, each present only when sent with its documented type.
fn describe(
    envelope: &Map<String, Value>,
    data: &Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Map<String, Value> {
    let mut out = Details::new(data, "data");
    out.take("user_id", "user_id", Expect::Integer, true);
    out.take("campaign_code", "campaign_code", Expect::String, true);
    out.take("short_link_code", "short_link_code", Expect::String, true);
    out.take(
        "unsubscribe_request_id",
        "unsubscribe_request_id",
        Expect::Integer,
        true,
    );
    out.take("group_id", "group_id", Expect::Integer, false);
    let Details {
        mut details,
        warnings: mut found,
        ..
    } = out;

    let empty = Map::new();
    let additional = match data.get("additional_data") {
        Some(Value::Object(additional)) => additional,
        None | Some(Value::Null) => {
            found.push("data.additional_data is missing".into());
            &empty
        }
        Some(_) => {
            found.push("data.additional_data is not an object; stored as absent".into());
            &empty
        }
    };
    let reason = match additional.get("reason") {
        Some(Value::Object(reason)) => reason,
        Some(Value::Null) | None => {
            found.push("data.additional_data.reason is missing".into());
            &empty
        }
        Some(_) => {
            found.push("data.additional_data.reason is not an object; stored as absent".into());
            &empty
        }
    };
    let mut reason_fields = Details::new(reason, "data.additional_data.reason");
    reason_fields.take("id", "reason_id", Expect::Integer, true);
    reason_fields.take("label", "reason_label", Expect::String, true);
    reason_fields.merge_into(&mut details, &mut found);

    // The schema lists additional_text beside the reason; the example nests it in
    // additional_data. Either place is accepted.
    let text_source = if additional.contains_key("additional_text") {
        (additional, "data.additional_data")
    } else {
        (data, "data")
    };
    let mut text = Details::new(text_source.0, text_source.1);
    text.take("additional_text", "additional_text", Expect::String, true);
    text.merge_into(&mut details, &mut found);

    let mut meta = Details::new(envelope, "");
    meta.take("api_version", "api_version", Expect::String, false);
    meta.take("attempt_number", "attempt_number", Expect::Integer, false);
    meta.take(
        "notification_task_id",
        "notification_task_id",
        Expect::String,
        false,
    );
    // The schema says attempt_total, the example attempts_total.
    if envelope.contains_key("attempt_total") {
        meta.take("attempt_total", "attempt_total", Expect::Integer, false);
    } else {
        meta.take("attempts_total", "attempt_total", Expect::Integer, false);
    }
    meta.merge_into(&mut details, &mut found);

    warnings.append(&mut found);
    details
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The example from the LOX24 page, verbatim.
    pub const SEED_EXAMPLE: &str = r#"{
"id": "ef58b437-1319-4b0c-961b-17214cf1cf32",
"data": {
"phone": "+4911113333444",
"user_id": 2,
"created_at": 1757849748,
"campaign_code": "3KCKb5nMD",
"additional_data": {
"reason": {
"id": 4,
"label": "Es ist unverständlich"
},
"additional_text": "zusätzlicher Benutzertext mit Erklärung"
},
"short_link_code": "baaIou",
"unsubscribe_request_id": 59
},
"name": "phone.unsubscribe",
"created_at": 1757849748,
"api_version": "2022-05-25",
"attempt_number": 1,
"attempts_total": 4
}"#;

    fn parse_value(value: serde_json::Value) -> Result<Delivery, PayloadError> {
        parse(value.to_string().as_bytes(), &Normalizer::default(), 42_000)
    }

    #[test]
    fn seed_example_becomes_an_unsubscribe_with_every_detail() {
        let Ok(Delivery::Unsubscribe { event, warnings }) =
            parse(SEED_EXAMPLE.as_bytes(), &Normalizer::default(), 1)
        else {
            panic!("seed example must parse");
        };
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            event.subject,
            Subject::Phone {
                phone: "+4911113333444".into()
            }
        );
        assert_eq!(
            event.idempotency_key,
            "lox24:ef58b437-1319-4b0c-961b-17214cf1cf32"
        );
        assert_eq!(event.event_time_ms, 1_757_849_748_000);
        let expected = json!({
            "user_id": 2, "campaign_code": "3KCKb5nMD", "short_link_code": "baaIou",
            "unsubscribe_request_id": 59, "reason_id": 4, "reason_label": "Es ist unverständlich",
            "additional_text": "zusätzlicher Benutzertext mit Erklärung", "api_version": "2022-05-25",
            "attempt_number": 1, "attempt_total": 4,
        });
        assert_eq!(serde_json::Value::Object(event.details), expected);
    }

    #[test]
    fn other_event_names_are_ignored_before_any_other_check() {
        assert_eq!(
            parse_value(json!({"name": "phone.subscribe"})),
            Ok(Delivery::Ignored {
                name: "phone.subscribe".into()
            })
        );
    }

    #[test]
    fn identifying_fields_are_required() {
        let field = |v| parse_value(v).err().and_then(|e| e.field);
        let phone = json!({"phone": "+4911113333444"});
        assert_eq!(field(json!({"id": "x"})).as_deref(), Some("name"));
        assert_eq!(field(json!({"name": 5})).as_deref(), Some("name"));
        assert_eq!(
            field(json!({"name": UNSUBSCRIBE, "data": phone})).as_deref(),
            Some("id")
        );
        assert_eq!(
            field(json!({"name": UNSUBSCRIBE, "id": "nope", "data": phone})).as_deref(),
            Some("id")
        );
        let id = "EF58B437-1319-4B0C-961B-17214CF1CF32";
        assert_eq!(
            field(json!({"name": UNSUBSCRIBE, "id": id})).as_deref(),
            Some("data.phone")
        );
        assert_eq!(
            field(json!({"name": UNSUBSCRIBE, "id": id, "data": {}})).as_deref(),
            Some("data.phone")
        );
        assert_eq!(
            field(json!({"name": UNSUBSCRIBE, "id": id, "data": {"phone": "call me"}})).as_deref(),
            Some("data.phone")
        );
        assert!(parse(b"{not json", &Normalizer::default(), 0).is_err());
    }

    #[test]
    fn cosmetic_fields_never_fail_the_event() {
        let body = json!({
            "name": UNSUBSCRIBE, "id": "EF58B437-1319-4B0C-961B-17214CF1CF32",
            "data": {"phone": "0049 111 13333444", "user_id": "two", "additional_data": 7, "created_at": "soon"},
            "created_at": 1_700_000_000, "attempt_total": 2, "surprise": true,
        });
        let Ok(Delivery::Unsubscribe { event, warnings }) = parse_value(body) else {
            panic!("must parse");
        };
        assert_eq!(
            event.event_id.as_deref(),
            Some("ef58b437-1319-4b0c-961b-17214cf1cf32")
        );
        assert_eq!(
            event.subject,
            Subject::Phone {
                phone: "+4911113333444".into()
            }
        );
        assert_eq!(event.event_time_ms, 1_700_000_000_000);
        assert!(!event.details.contains_key("user_id"));
        assert_eq!(event.details.get("attempt_total"), Some(&json!(2)));
        assert!(
            warnings.iter().any(|w| w.contains("data.user_id")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("data.created_at")),
            "{warnings:?}"
        );
    }

    #[test]
    fn receive_time_is_the_last_resort_event_time() {
        let body = json!({"name": UNSUBSCRIBE, "id": "ef58b437-1319-4b0c-961b-17214cf1cf32", "data": {"phone": "+4911113333444"}});
        let Ok(Delivery::Unsubscribe { event, .. }) = parse_value(body) else {
            panic!("must parse");
        };
        assert_eq!(event.event_time_ms, 42_000);
    }
}
