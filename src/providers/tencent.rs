//! Tencent Cloud Chat: `OfficialAccount.CallbackAfterDeleteSubscriber`, sent after users
//! unsubscribe from an official account.
//!
//! What happens when Tencent calls us:
//! 1. `POST /webhooks/tencent?SdkAppid=…&CallbackCommand=…&contenttype=json&ClientIP=…&OptPlatform=…`
//!    (plus `Sign` and `RequestTime` when a token is configured). Tencent sends every configured
//!    callback to this one URL. [`check_request`] (this module) authenticates it: `SdkAppid`
//!    must be ours (403), then, with a token, `Sign`/`RequestTime` must be present (401), match
//!    `hex(SHA-256(token + RequestTime))` and lie within `--tencent-max-skew` of our clock (403).
//! 2. Any other `CallbackCommand` is acknowledged and ignored. For the unsubscribe, [`parse`]
//!    turns every `Subscriber_Account` into an unsubscribe of the account in scope
//!    `tencent:{Official_Account}`. Tencent does not retry "after" callbacks, so an entry without
//!    a `Subscriber_Account` is skipped and named in `ErrorInfo` rather than failing the others.
//! 3. The request's events are committed as one atomic unit and made durable before the answer,
//!    which is always Tencent's JSON shape `{"ActionStatus", "ErrorCode", "ErrorInfo"}`.
//!    Redeliveries are recognised by (Official_Account, Subscriber_Account, EventTime).

use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use super::{parse_json, PayloadError};
use crate::event::{Event, Kind, Source, Subject, MAX_ID_BYTES};
use crate::secret::AuthFailure;

/// The one callback command suppressd acts on.
pub const DELETE_SUBSCRIBER: &str = "OfficialAccount.CallbackAfterDeleteSubscriber";

#[derive(Debug, Clone)]
pub struct TencentConfig {
    pub sdkappid: String,
    /// The webhook token; `None` leaves signatures unchecked.
    pub token: Option<String>,
    pub max_skew_secs: u64,
}

/// The URL parameters Tencent appends, as received.
#[derive(Debug, Default, Clone)]
pub struct UrlParams {
    pub sdkappid: Option<String>,
    pub command: Option<String>,
    pub sign: Option<String>,
    pub request_time: Option<String>,
}

/// Authenticates a request by its URL parameters at `now_secs`.
pub fn check_request(
    config: &TencentConfig,
    params: &UrlParams,
    now_secs: i64,
) -> Result<(), (AuthFailure, &'static str)> {
    if params.sdkappid.as_deref() != Some(config.sdkappid.as_str()) {
        return Err((
            AuthFailure::Wrong,
            "SdkAppid is missing or not this application's",
        ));
    }
    let Some(token) = &config.token else {
        return Ok(());
    };
    let (Some(sign), Some(request_time)) = (&params.sign, &params.request_time) else {
        return Err((AuthFailure::Missing, "Sign and RequestTime are required"));
    };
    if !sign_matches(token, request_time, sign) {
        return Err((AuthFailure::Wrong, "Sign does not match"));
    }
    let fresh = request_time
        .parse::<i64>()
        .is_ok_and(|t| now_secs.abs_diff(t) <= config.max_skew_secs);
    if !fresh {
        return Err((
            AuthFailure::Wrong,
            "RequestTime is outside the accepted clock skew (replay?)",
        ));
    }
    Ok(())
}

/// `Sign == hex(SHA-256(token + RequestTime))`, compared case-insensitively in constant time.
pub fn sign_matches(token: &str, request_time: &str, sign: &str) -> bool {
    let expected = expected_sign(token, request_time);
    let given = sign.to_ascii_lowercase();
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

fn expected_sign(token: &str, request_time: &str) -> String {
    crate::secret::sha256_hex(format!("{token}{request_time}").as_bytes())
}

/// An entry of `SubscribeAccountList` that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub position: usize,
    pub reason: &'static str,
}

/// What a Tencent delivery asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Unsubscribe {
        events: Vec<Event>,
        skipped: Vec<Skipped>,
        warnings: Vec<String>,
    },
    /// Another callback command: acknowledged, not stored.
    Ignored { command: String },
}

/// Parses a Tencent webhook body; `url_command` is the URL's `CallbackCommand`, which decides.
pub fn parse(
    body: &[u8],
    url_command: Option<&str>,
    receive_time_ms: i64,
) -> Result<Delivery, PayloadError> {
    let json = parse_json(body);
    let body_command = json
        .as_ref()
        .ok()
        .and_then(|json| json.get("CallbackCommand"))
        .and_then(Value::as_str);
    // A body that names another command than its URL is refused whichever of the two is the
    // unsubscribe: acting on either could store an opt-out that was not sent, or drop one that was.
    if let (Some(url), Some(body)) = (url_command, body_command) {
        if url != body {
            return Err(PayloadError::field(
                "CallbackCommand",
                format!("body CallbackCommand {body:?} contradicts the URL's {url:?}"),
            ));
        }
    }
    match url_command.or(body_command) {
        Some(command) if command != DELETE_SUBSCRIBER => {
            return Ok(Delivery::Ignored {
                command: command.to_owned(),
            })
        }
        Some(_) => {}
        None => {
            json?;
            return Err(PayloadError::field(
                "CallbackCommand",
                "CallbackCommand is required",
            ));
        }
    }
    let json = json?;
    let object = json
        .as_object()
        .ok_or_else(|| PayloadError::body("body must be a JSON object"))?;
    let official = match object.get("Official_Account") {
        Some(Value::String(official)) if !official.is_empty() && official.len() <= MAX_ID_BYTES => {
            official
        }
        _ => {
            return Err(PayloadError::field(
                "Official_Account",
                "Official_Account must be a non-empty string",
            ))
        }
    };
    let list = object
        .get("SubscribeAccountList")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            PayloadError::field(
                "SubscribeAccountList",
                "SubscribeAccountList must be an array",
            )
        })?;
    super::check_batch_len("SubscribeAccountList", list.len())?;

    let mut warnings = Vec::new();
    let event_time_ms = match object.get("EventTime") {
        Some(value) if value.as_i64().is_some_and(|t| t >= 0) => {
            value.as_i64().unwrap_or(receive_time_ms)
        }
        other => {
            warnings.push(match other {
                None | Some(Value::Null) => {
                    "EventTime is missing; the receive time is used".to_owned()
                }
                Some(_) => {
                    "EventTime is not a millisecond timestamp; the receive time is used".to_owned()
                }
            });
            receive_time_ms
        }
    };
    let mut details = Map::new();
    match object.get("Operator_Account") {
        Some(Value::String(operator)) => {
            details.insert("operator_account".into(), json!(operator));
        }
        None | Some(Value::Null) => warnings.push("Operator_Account is missing".into()),
        Some(_) => warnings.push("Operator_Account is not a string; stored as absent".into()),
    }

    let scope = format!("tencent:{official}");
    let mut events = Vec::new();
    let mut skipped = Vec::new();
    for (position, entry) in list.iter().enumerate() {
        let account = match entry.get("Subscriber_Account") {
            Some(Value::String(account))
                if !account.is_empty() && account.len() <= MAX_ID_BYTES =>
            {
                account
            }
            Some(Value::String(account)) if !account.is_empty() => {
                skipped.push(Skipped {
                    position,
                    reason: "Subscriber_Account is too long",
                });
                continue;
            }
            _ => {
                skipped.push(Skipped {
                    position,
                    reason: "no Subscriber_Account",
                });
                continue;
            }
        };
        events.push(Event {
            subject: Subject::Account {
                scope: scope.clone(),
                account: account.clone(),
            },
            source: Source::Tencent,
            kind: Kind::Unsubscribe,
            idempotency_key: idempotency_key(official, account, event_time_ms),
            event_id: None,
            event_time_ms,
            receive_time_ms,
            details: details.clone(),
        });
    }
    if events.is_empty() {
        return Err(PayloadError::field(
            "SubscribeAccountList",
            "SubscribeAccountList has no entry with a Subscriber_Account",
        ));
    }
    Ok(Delivery::Unsubscribe {
        events,
        skipped,
        warnings,
    })
}

/// Length-prefixed so that no two different triples share a key.
fn idempotency_key(official: &str, account: &str, event_time_ms: i64) -> String {
    format!(
        "tencent:{}:{official}:{}:{account}:{event_time_ms}",
        official.len(),
        account.len()
    )
}

/// `ErrorInfo` naming the skipped entries by list position.
pub fn describe_skipped(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(|s| format!("SubscribeAccountList[{}] skipped: {}", s.position, s.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(token: Option<&str>) -> TencentConfig {
        TencentConfig {
            sdkappid: "1400000000".into(),
            token: token.map(str::to_owned),
            max_skew_secs: 60,
        }
    }

    fn params(sdkappid: Option<&str>, sign: Option<&str>, time: Option<&str>) -> UrlParams {
        UrlParams {
            sdkappid: sdkappid.map(str::to_owned),
            command: Some(DELETE_SUBSCRIBER.into()),
            sign: sign.map(str::to_owned),
            request_time: time.map(str::to_owned),
        }
    }

    const VECTOR_SIGN: &str = "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061";

    #[test]
    fn published_signature_vector() {
        assert_eq!(expected_sign("xxxxyyyy", "1669872112"), VECTOR_SIGN);
        assert!(sign_matches(
            "xxxxyyyy",
            "1669872112",
            &VECTOR_SIGN.to_uppercase()
        ));
        assert!(!sign_matches("xxxxyyyz", "1669872112", VECTOR_SIGN));
    }

    #[test]
    fn request_checks_in_order() {
        let signed = config(Some("xxxxyyyy"));
        let now = 1_669_872_112;
        let ok = params(Some("1400000000"), Some(VECTOR_SIGN), Some("1669872112"));
        assert!(check_request(&signed, &ok, now).is_ok());
        assert!(check_request(&signed, &ok, now + 60).is_ok());
        assert_eq!(
            check_request(&signed, &ok, now + 61).map_err(|e| e.0),
            Err(AuthFailure::Wrong)
        );
        assert_eq!(
            check_request(&signed, &ok, now - 61).map_err(|e| e.0),
            Err(AuthFailure::Wrong)
        );
        let wrong_app = params(Some("1"), None, None);
        assert_eq!(
            check_request(&signed, &wrong_app, now).map_err(|e| e.0),
            Err(AuthFailure::Wrong)
        );
        let no_sign = params(Some("1400000000"), None, Some("1669872112"));
        assert_eq!(
            check_request(&signed, &no_sign, now).map_err(|e| e.0),
            Err(AuthFailure::Missing)
        );
        let bad_sign = params(Some("1400000000"), Some("00"), Some("1669872112"));
        assert_eq!(
            check_request(&signed, &bad_sign, now).map_err(|e| e.0),
            Err(AuthFailure::Wrong)
        );
        assert!(check_request(&config(None), &params(Some("1400000000"), None, None), now).is_ok());
    }

    /// The sample from Tencent's page with its `//` comments removed.
    const SAMPLE: &str = r#"{
    "CallbackCommand": "OfficialAccount.CallbackAfterDeleteSubscriber",
    "Official_Account" : "@TOA#_test_OA_for_penn",
    "Operator_Account": "leckie",
    "SubscribeAccountList": [
    {
    "Subscriber_Account": "jared"
    },
    {
    "Subscriber_Account": "leckie"
    }
    ],
    "EventTime": 1670574414123
    }"#;

    #[test]
    fn sample_unsubscribes_every_subscriber() {
        let Ok(Delivery::Unsubscribe {
            events,
            skipped,
            warnings,
        }) = parse(SAMPLE.as_bytes(), Some(DELETE_SUBSCRIBER), 1)
        else {
            panic!("sample must parse");
        };
        assert!(
            skipped.is_empty() && warnings.is_empty(),
            "{skipped:?} {warnings:?}"
        );
        let accounts: Vec<_> = events
            .iter()
            .map(|e| match &e.subject {
                Subject::Account { scope, account } => (scope.as_str(), account.as_str()),
                Subject::Phone { .. } => panic!("phone"),
            })
            .collect();
        assert_eq!(
            accounts,
            [
                ("tencent:@TOA#_test_OA_for_penn", "jared"),
                ("tencent:@TOA#_test_OA_for_penn", "leckie")
            ]
        );
        assert!(events.iter().all(|e| e.event_time_ms == 1_670_574_414_123));
        assert_eq!(
            events[0].details.get("operator_account"),
            Some(&json!("leckie"))
        );
    }

    #[test]
    fn unusable_entries_are_skipped_and_named() {
        let body = json!({
            "CallbackCommand": DELETE_SUBSCRIBER, "Official_Account": "oa", "EventTime": 5,
            "SubscribeAccountList": [{"Subscriber_Account": "a"}, {"Nope": 1}, "x", {"Subscriber_Account": ""}],
        });
        let Ok(Delivery::Unsubscribe {
            events, skipped, ..
        }) = parse(body.to_string().as_bytes(), None, 1)
        else {
            panic!("must parse");
        };
        assert_eq!(events.len(), 1);
        assert_eq!(
            skipped.iter().map(|s| s.position).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(describe_skipped(&skipped).contains("SubscribeAccountList[1]"));
        let none = json!({"Official_Account": "oa", "SubscribeAccountList": [{}]});
        assert!(parse(none.to_string().as_bytes(), Some(DELETE_SUBSCRIBER), 1).is_err());
    }

    #[test]
    fn the_url_command_decides() {
        let other = Some("OfficialAccount.CallbackAfterAddSubscriber");
        assert!(matches!(
            parse(b"not even json", other, 1),
            Ok(Delivery::Ignored { .. })
        ));
        let contradicting = SAMPLE.replace(DELETE_SUBSCRIBER, "Other.Command");
        assert_eq!(
            parse(contradicting.as_bytes(), Some(DELETE_SUBSCRIBER), 1)
                .err()
                .and_then(|e| e.field),
            Some("CallbackCommand".into())
        );
        // The other way round too: a delete in the body under another command's URL.
        assert_eq!(
            parse(SAMPLE.as_bytes(), other, 1)
                .err()
                .and_then(|e| e.field),
            Some("CallbackCommand".into())
        );
    }
}
