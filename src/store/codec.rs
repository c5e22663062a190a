//! The binary form of an event in the log and in snapshots.
//!
//! Every acknowledged event is written here before anything else, and a snapshot holds every
//! event of the list, so their size is what the log's `fdatasync`s and a rebuild's reads cost.
//! JSON spent most of its bytes on field names and on an imported number's minted key, which
//! repeats its event id; this layout spends about 60 bytes on such an event instead of ~230.
//!
//! An event is its subject, then its body:
//! - subject: `0` ‖ len ‖ E.164, or `1` ‖ len ‖ scope ‖ len ‖ account;
//! - body: source (u8) ‖ kind (u8) ‖ flags (u8) ‖ event id (16 bytes when it is a UUID in
//!   canonical form, else len ‖ UTF-8; absent unless flagged) ‖ idempotency key (len ‖ UTF-8;
//!   absent when it is `{source}:{event id}`) ‖ event time (zigzag varint, ms) ‖ receive time
//!   minus event time (zigzag varint) ‖ details (len ‖ JSON; absent when empty).
//!
//! Lengths are LEB128 varints. The numbers given to sources and kinds are part of the format.
//! Decoding checks every length against what is left, so a damaged file is an error naming the
//! offset, never a panic or a huge allocation.

use serde_json::{Map, Value};

use crate::event::{Event, Kind, Source, Subject};

const EVENT_ID: u8 = 1;
const EVENT_ID_IS_UUID: u8 = 2;
const KEY_IS_SOURCE_AND_ID: u8 = 4;
const DETAILS: u8 = 8;
const KNOWN_FLAGS: u8 = EVENT_ID | EVENT_ID_IS_UUID | KEY_IS_SOURCE_AND_ID | DETAILS;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct DecodeError {
    /// Offset within the decoded bytes.
    pub at: usize,
    pub what: &'static str,
}

pub fn put_event(out: &mut Vec<u8>, event: &Event) {
    put_subject(out, &event.subject);
    put_body(out, event);
}

pub fn put_subject(out: &mut Vec<u8>, subject: &Subject) {
    match subject {
        Subject::Phone { phone } => {
            out.push(0);
            put_bytes(out, phone.as_bytes());
        }
        Subject::Account { scope, account } => {
            out.push(1);
            put_bytes(out, scope.as_bytes());
            put_bytes(out, account.as_bytes());
        }
    }
}

/// Everything of `event` but its subject.
pub fn put_body(out: &mut Vec<u8>, event: &Event) {
    out.push(source_code(event.source));
    out.push(kind_code(event.kind));
    let uuid = event.event_id.as_deref().and_then(|id| {
        uuid::Uuid::try_parse(id)
            .ok()
            .filter(|u| is_canonical(u, id))
    });
    let key_is_source_and_id = event.event_id.as_deref().is_some_and(|id| {
        event
            .idempotency_key
            .strip_prefix(event.source.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            == Some(id)
    });
    let mut flags = 0;
    if event.event_id.is_some() {
        flags |= EVENT_ID;
    }
    if uuid.is_some() {
        flags |= EVENT_ID_IS_UUID;
    }
    if key_is_source_and_id {
        flags |= KEY_IS_SOURCE_AND_ID;
    }
    if !event.details.is_empty() {
        flags |= DETAILS;
    }
    out.push(flags);
    match (uuid, &event.event_id) {
        (Some(uuid), _) => out.extend_from_slice(uuid.as_bytes()),
        (None, Some(id)) => put_bytes(out, id.as_bytes()),
        (None, None) => {}
    }
    if !key_is_source_and_id {
        put_bytes(out, event.idempotency_key.as_bytes());
    }
    put_varint(out, zigzag(event.event_time_ms));
    put_varint(
        out,
        zigzag(event.receive_time_ms.wrapping_sub(event.event_time_ms)),
    );
    if !event.details.is_empty() {
        // Serialising a map of JSON values into a Vec cannot fail.
        let details = serde_json::to_vec(&event.details).unwrap_or_default();
        put_bytes(out, &details);
    }
}

fn is_canonical(uuid: &uuid::Uuid, text: &str) -> bool {
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid.hyphenated().encode_lower(&mut buffer) == text
}

pub fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

fn source_code(source: Source) -> u8 {
    match source {
        Source::Lox24 => 0,
        Source::Tencent => 1,
        Source::Sendios => 2,
        Source::Manual => 3,
        Source::Import => 4,
    }
}

fn source_of(code: u8) -> Option<Source> {
    Some(match code {
        0 => Source::Lox24,
        1 => Source::Tencent,
        2 => Source::Sendios,
        3 => Source::Manual,
        4 => Source::Import,
        _ => return None,
    })
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Unsubscribe => 0,
        Kind::SmsSent => 1,
        Kind::SmsLost => 2,
        Kind::SmsClick => 3,
        Kind::Undeliverable => 4,
        Kind::Suppress => 5,
        Kind::Lift => 6,
    }
}

fn kind_of(code: u8) -> Option<Kind> {
    Some(match code {
        0 => Kind::Unsubscribe,
        1 => Kind::SmsSent,
        2 => Kind::SmsLost,
        3 => Kind::SmsClick,
        4 => Kind::Undeliverable,
        5 => Kind::Suppress,
        6 => Kind::Lift,
        _ => return None,
    })
}

/// Reads values back from bytes written by the `put_*` functions.
pub struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, at: 0 }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    pub fn position(&self) -> usize {
        self.at
    }

    fn error(&self, what: &'static str) -> DecodeError {
        DecodeError { at: self.at, what }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.error(what))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte(what)?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(self.error(what))
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.varint(what)?).map_err(|_| self.error(what))?;
        self.take(len, what)
    }

    fn text(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let at = self.at;
        let bytes = self.bytes(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError { at, what })
    }

    pub fn event(&mut self) -> Result<Event, DecodeError> {
        let subject = self.subject()?;
        self.body(subject)
    }

    pub fn subject(&mut self) -> Result<Subject, DecodeError> {
        match self.byte("subject")? {
            0 => Ok(Subject::Phone {
                phone: self.text("phone")?,
            }),
            1 => Ok(Subject::Account {
                scope: self.text("scope")?,
                account: self.text("account")?,
            }),
            _ => Err(self.error("unknown subject type")),
        }
    }

    pub fn body(&mut self, subject: Subject) -> Result<Event, DecodeError> {
        let source = source_of(self.byte("source")?).ok_or_else(|| self.error("unknown source"))?;
        let kind = kind_of(self.byte("kind")?).ok_or_else(|| self.error("unknown kind"))?;
        let flags = self.byte("flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(self.error("unknown flags"));
        }
        let event_id = match (flags & EVENT_ID != 0, flags & EVENT_ID_IS_UUID != 0) {
            (true, true) => {
                let bytes = self.take(16, "event id")?;
                let uuid = uuid::Uuid::from_slice(bytes).map_err(|_| self.error("event id"))?;
                Some(uuid.hyphenated().to_string())
            }
            (true, false) => Some(self.text("event id")?),
            (false, false) => None,
            (false, true) => return Err(self.error("a UUID event id flagged absent")),
        };
        let idempotency_key = match (flags & KEY_IS_SOURCE_AND_ID != 0, &event_id) {
            (true, Some(id)) => format!("{}:{id}", source.as_str()),
            (true, None) => return Err(self.error("a key made of an absent event id")),
            (false, _) => self.text("idempotency key")?,
        };
        let event_time_ms = unzigzag(self.varint("event time")?);
        let receive_time_ms = event_time_ms.wrapping_add(unzigzag(self.varint("receive time")?));
        let details = if flags & DETAILS != 0 {
            let at = self.at;
            let json = self.bytes("details")?;
            serde_json::from_slice::<Map<String, Value>>(json).map_err(|_| DecodeError {
                at,
                what: "details are not a JSON object",
            })?
        } else {
            Map::new()
        };
        Ok(Event {
            subject,
            source,
            kind,
            idempotency_key,
            event_id,
            event_time_ms,
            receive_time_ms,
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<Event> {
        let (id, key) = crate::event::mint_idempotency_key(Source::Import);
        let mut details = Map::new();
        details.insert("campaign_code".into(), Value::from("C1"));
        details.insert("nested".into(), serde_json::json!({"a": [1, 2.5, null]}));
        vec![
            Event {
                subject: Subject::Phone {
                    phone: "+4915112345678".into(),
                },
                source: Source::Import,
                kind: Kind::Unsubscribe,
                idempotency_key: key,
                event_id: Some(id),
                event_time_ms: 1_757_849_748_123,
                receive_time_ms: 1_757_849_748_123,
                details: Map::new(),
            },
            Event {
                subject: Subject::Account {
                    scope: "sendios:5".into(),
                    account: "jared ü".into(),
                },
                source: Source::Sendios,
                kind: Kind::SmsLost,
                idempotency_key: "sendios:5:99:sms_lost".into(),
                event_id: Some("99".into()),
                event_time_ms: -5,
                receive_time_ms: i64::MAX,
                details,
            },
            Event {
                subject: Subject::Phone {
                    phone: "+12025550123".into(),
                },
                source: Source::Lox24,
                kind: Kind::Lift,
                // An upper-case UUID is kept as text: it must come back exactly.
                idempotency_key: "lox24:0E6B1F0C-8A9B-4A35-9F7E-9C0B2F3F4A10".into(),
                event_id: Some("0E6B1F0C-8A9B-4A35-9F7E-9C0B2F3F4A10".into()),
                event_time_ms: i64::MIN,
                receive_time_ms: 0,
                details: Map::new(),
            },
            Event {
                subject: Subject::Phone {
                    phone: "+12025550124".into(),
                },
                source: Source::Tencent,
                kind: Kind::Unsubscribe,
                idempotency_key: "tencent:x:y:1".into(),
                event_id: None,
                event_time_ms: 0,
                receive_time_ms: 3,
                details: Map::new(),
            },
        ]
    }

    #[test]
    fn events_round_trip_and_an_imported_number_is_small() {
        let events = events();
        let mut out = Vec::new();
        for event in &events {
            let before = out.len();
            put_event(&mut out, event);
            if event.source == Source::Import {
                assert!(out.len() - before < 48, "{} bytes", out.len() - before);
            }
        }
        let mut cursor = Cursor::new(&out);
        for event in &events {
            assert_eq!(&cursor.event().expect("decodes"), event);
        }
        assert!(cursor.is_empty());
    }

    #[test]
    fn every_truncation_and_most_damage_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        for event in events() {
            put_event(&mut out, &event);
        }
        for len in 0..out.len() {
            let mut cursor = Cursor::new(&out[..len]);
            let decoded: Result<Vec<Event>, _> = (0..4).map(|_| cursor.event()).collect();
            assert!(decoded.is_err(), "{len} bytes decoded as four events");
        }
        for at in 0..out.len() {
            let mut damaged = out.clone();
            damaged[at] ^= 0xff;
            let mut cursor = Cursor::new(&damaged);
            // Either an error or some events; never a panic.
            let _ = (0..4)
                .map(|_| cursor.event())
                .collect::<Result<Vec<_>, _>>();
        }
    }
}
