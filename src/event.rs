//! The canonical event: what every provider module produces from its payload and the only thing
//! the store understands. A provider's quirks end at its parser; from here on an unsubscribe from
//! LOX24 and one from any other source are the same kind of value.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who or what a suppression is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Subject {
    /// An E.164 phone number, already normalised.
    Phone { phone: String },
    /// An account within a scope such as `tencent:{Official_Account}` or `sendios:{project_id}`.
    Account { scope: String, account: String },
}

/// Longest scope or account id accepted, in bytes; keys stay small and length-prefixable.
pub const MAX_ID_BYTES: usize = 1024;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Lox24,
    Tencent,
    Sendios,
    /// An operator, through the API.
    Manual,
    /// An existing opt-out list loaded with `POST /v1/import`.
    Import,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Lox24 => "lox24",
            Source::Tencent => "tencent",
            Source::Sendios => "sendios",
            Source::Manual => "manual",
            Source::Import => "import",
        }
    }
}

/// What an event means for its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The recipient asked not to be messaged again.
    Unsubscribe,
    /// A message was sent (history only).
    SmsSent,
    /// A message was sent but not delivered; enough in a row make the subject undeliverable.
    SmsLost,
    /// The recipient clicked a link: reachable again.
    SmsClick,
    /// A reason (never an event): too many consecutive lost messages.
    Undeliverable,
    /// An operator suppressed the subject.
    Suppress,
    /// An operator lifted the suppression (e.g. the person opted back in).
    Lift,
}

/// One thing that happened to one subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub subject: Subject,
    pub source: Source,
    pub kind: Kind,
    /// Deduplicates redeliveries: the same key is applied once, ever (for a key suppressd
    /// minted, once per subject; see [`mint_idempotency_key`]).
    pub idempotency_key: String,
    /// The provider's own id for the event, where it gives one.
    pub event_id: Option<String>,
    /// When it happened, per the provider (Unix milliseconds); orders events of one subject.
    pub event_time_ms: i64,
    /// When suppressd received it (Unix milliseconds).
    pub receive_time_ms: i64,
    /// The provider's descriptive fields, absent where the provider sent none or an ill-typed one.
    pub details: Map<String, Value>,
}

/// A fresh event id and the idempotency key made from it, for an event that suppressd itself
/// originates (an imported number, a manual change) and that so has no key of its own.
///
/// Such a key can come back only with the event it was made for (an export imported again, a
/// write-ahead-log replay), so with the same subject: the store finds it among that subject's
/// history instead of keeping a key for it, which for an imported list is a third of its keys.
pub fn mint_idempotency_key(source: Source) -> (String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let key = format!("{}:{id}", source.as_str());
    (id, key)
}

/// Whether `key` has the shape of one [`mint_idempotency_key`] makes. Provider keys never do:
/// each provider's start with its own name.
pub fn is_minted_idempotency_key(key: &str) -> bool {
    [Source::Import, Source::Manual].iter().any(|source| {
        key.strip_prefix(source.as_str())
            .is_some_and(|rest| rest.starts_with(':'))
    })
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
}

/// Unix milliseconds floored to Unix seconds.
pub fn ms_to_secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}
