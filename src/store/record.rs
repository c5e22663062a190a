//! The suppression record of one subject and the rules that change it. Pure data and pure
//! functions: the committer feeds events through [`Record::apply`] and stores the result; nothing
//! here touches the disk.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::{Event, Kind, Source};

/// Stored value layout version; bump when the layout changes.
const FORMAT_VERSION: u8 = 1;
/// `[version][suppressed][since_ms: i64 BE]`, then the JSON of the record. The fixed header lets a
/// bulk check answer from ten bytes without parsing JSON.
const HEADER_LEN: usize = 10;
/// A subject that unsubscribes over and over keeps every event in its history, but only this many
/// reasons in its record (the earliest ones, which decide `since`), so that a record stays small
/// enough to live inside sled's log rather than in an unsynced blob file.
pub const MAX_REASONS: usize = 64;

/// Why a subject is suppressed: one event that is in force. Stored exactly in the shape the API
/// shows, so a lookup can copy the stored reasons into its response without rebuilding them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub source: Source,
    pub kind: Kind,
    pub event_id: Option<String>,
    /// `event_time_ms` floored to Unix seconds.
    pub event_time: i64,
    pub event_time_ms: i64,
    pub details: Map<String, Value>,
}

/// Everything the list knows about one subject now (its past is in the history tree).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Events in force, earliest first; the subject is suppressed while there is any.
    pub reasons: Vec<Reason>,
    /// Receive time of the last event that changed the record.
    pub changed_at_ms: i64,
    /// Consecutive `sms_lost` events, in arrival order, since the last `sms_click`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_streak: u32,
    /// Event time of the latest lift: suppressing events older than this lose to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_at_ms: Option<i64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Policy knobs that decide how events change records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Consecutive `sms_lost` events that make a subject undeliverable; 0 disables.
    pub lost_threshold: u32,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { lost_threshold: 3 }
    }
}

/// The part of a record a bulk check needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    pub suppressed: bool,
    pub since_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
#[error("stored record is unreadable ({0}); restore the data directory from a backup or export")]
pub struct CorruptRecord(String);

impl CorruptRecord {
    pub fn key(key: &[u8]) -> Self {
        CorruptRecord(format!("record key {key:02x?} does not name a subject"))
    }
}

impl Record {
    pub fn suppressed(&self) -> bool {
        !self.reasons.is_empty()
    }

    /// The earliest event time among the reasons in force.
    pub fn since_ms(&self) -> Option<i64> {
        self.reasons.iter().map(|r| r.event_time_ms).min()
    }

    /// Applies `event`, returning whether the record changed.
    ///
    /// Order is by event time, not arrival: a suppressing event older than the latest lift
    /// loses to it (a late retry of an unsubscribe that the person has since revoked must not
    /// re-suppress), and at equal times suppression wins.
    pub fn apply(&mut self, event: &Event, rules: &Rules) -> bool {
        match event.kind {
            Kind::Unsubscribe | Kind::Suppress if self.lifted_after(event.event_time_ms) => false,
            Kind::Unsubscribe | Kind::Suppress => self.add_reason(event, event.kind),
            Kind::SmsSent | Kind::Undeliverable => false,
            Kind::Lift => {
                let before = self.reasons.len();
                self.reasons
                    .retain(|r| r.event_time_ms >= event.event_time_ms);
                let lifted_at = self
                    .lifted_at_ms
                    .map_or(event.event_time_ms, |t| t.max(event.event_time_ms));
                let changed = before != self.reasons.len()
                    || self.lost_streak != 0
                    || self.lifted_at_ms != Some(lifted_at);
                self.lost_streak = 0;
                self.lifted_at_ms = Some(lifted_at);
                if changed {
                    self.changed_at_ms = event.receive_time_ms;
                }
                changed
            }
            Kind::SmsLost => {
                self.lost_streak = self.lost_streak.saturating_add(1);
                let crossed = rules.lost_threshold > 0
                    && self.lost_streak >= rules.lost_threshold
                    && !self.reasons.iter().any(|r| r.kind == Kind::Undeliverable);
                if crossed && !self.lifted_after(event.event_time_ms) {
                    self.add_reason(event, Kind::Undeliverable);
                }
                self.changed_at_ms = event.receive_time_ms;
                true
            }
            Kind::SmsClick => {
                // A click proves the subject reachable: it ends an undeliverable suppression,
                // never an unsubscribe.
                let before = (self.lost_streak, self.reasons.len());
                self.lost_streak = 0;
                self.reasons.retain(|r| r.kind != Kind::Undeliverable);
                let changed = before != (self.lost_streak, self.reasons.len());
                if changed {
                    self.changed_at_ms = event.receive_time_ms;
                }
                changed
            }
        }
    }

    fn lifted_after(&self, event_time_ms: i64) -> bool {
        self.lifted_at_ms
            .is_some_and(|lifted| lifted > event_time_ms)
    }

    /// Whether lifting needs evidence of renewed consent: some reason in force came from the
    /// person (a provider unsubscribe) rather than from an operator or from undeliverability.
    pub fn lift_needs_note(&self) -> bool {
        self.reasons.iter().any(|r| r.kind == Kind::Unsubscribe)
    }

    fn add_reason(&mut self, event: &Event, kind: Kind) -> bool {
        if self.reasons.len() >= MAX_REASONS {
            let Some(latest) = self.reasons.last() else {
                return false;
            };
            if event.event_time_ms >= latest.event_time_ms {
                return false;
            }
            self.reasons.pop();
        }
        let at = self
            .reasons
            .partition_point(|r| r.event_time_ms <= event.event_time_ms);
        self.reasons.insert(
            at,
            Reason {
                source: event.source,
                kind,
                event_id: event.event_id.clone(),
                event_time: crate::event::ms_to_secs(event.event_time_ms),
                event_time_ms: event.event_time_ms,
                details: event.details.clone(),
            },
        );
        self.changed_at_ms = event.receive_time_ms;
        true
    }

    pub fn status(&self) -> Status {
        Status {
            suppressed: self.suppressed(),
            since_ms: self.since_ms(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let status = self.status();
        let mut out = Vec::with_capacity(256);
        out.push(FORMAT_VERSION);
        out.push(u8::from(status.suppressed));
        out.extend_from_slice(&status.since_ms.unwrap_or(i64::MIN).to_be_bytes());
        // Serialising plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, self);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, CorruptRecord> {
        decode_status(bytes)?;
        serde_json::from_slice(&bytes[HEADER_LEN..]).map_err(|e| CorruptRecord(e.to_string()))
    }
}

/// The stored reasons of a record as raw JSON, without parsing them into values.
pub fn reasons_json(bytes: &[u8]) -> Result<&serde_json::value::RawValue, CorruptRecord> {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        reasons: &'a serde_json::value::RawValue,
    }
    decode_status(bytes)?;
    serde_json::from_slice::<Raw<'_>>(&bytes[HEADER_LEN..])
        .map(|raw| raw.reasons)
        .map_err(|e| CorruptRecord(e.to_string()))
}

/// Reads only the fixed header of a stored record.
pub fn decode_status(bytes: &[u8]) -> Result<Status, CorruptRecord> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| CorruptRecord(format!("{} bytes is shorter than a header", bytes.len())))?;
    if header[0] != FORMAT_VERSION {
        return Err(CorruptRecord(format!(
            "unknown format version {}",
            header[0]
        )));
    }
    let mut since = [0u8; 8];
    since.copy_from_slice(&header[2..]);
    let since = i64::from_be_bytes(since);
    Ok(Status {
        suppressed: header[1] != 0,
        since_ms: (since != i64::MIN).then_some(since),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Subject;

    fn unsubscribe(id: &str, at_ms: i64) -> Event {
        Event {
            subject: Subject::Phone {
                phone: "+4911113333444".into(),
            },
            source: Source::Lox24,
            kind: Kind::Unsubscribe,
            idempotency_key: format!("lox24:{id}"),
            event_id: Some(id.into()),
            event_time_ms: at_ms,
            receive_time_ms: at_ms + 5,
            details: Map::new(),
        }
    }

    #[test]
    fn since_is_the_earliest_unsubscribe_in_force() {
        let mut record = Record::default();
        let rules = Rules::default();
        assert!(record.apply(&unsubscribe("b", 2_000), &rules));
        assert!(record.apply(&unsubscribe("a", 1_000), &rules));
        assert!(record.apply(&unsubscribe("c", 3_000), &rules));
        assert_eq!(record.since_ms(), Some(1_000));
        let ids: Vec<_> = record
            .reasons
            .iter()
            .filter_map(|r| r.event_id.as_deref())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn reasons_are_capped_keeping_the_earliest() {
        let mut record = Record::default();
        for i in 0..MAX_REASONS as i64 + 10 {
            record.apply(&unsubscribe(&i.to_string(), 10_000 + i), &Rules::default());
        }
        assert_eq!(record.reasons.len(), MAX_REASONS);
        assert!(record.apply(&unsubscribe("early", 5), &Rules::default()));
        assert_eq!(record.reasons.len(), MAX_REASONS);
        assert_eq!(record.since_ms(), Some(5));
    }

    fn sendios(kind: Kind, at_ms: i64) -> Event {
        Event {
            kind,
            source: Source::Sendios,
            ..unsubscribe(&at_ms.to_string(), at_ms)
        }
    }

    #[test]
    fn consecutive_losses_make_undeliverable_and_a_click_lifts_only_that() {
        let rules = Rules { lost_threshold: 3 };
        let mut record = Record::default();
        record.apply(&sendios(Kind::SmsLost, 1_000), &rules);
        record.apply(&sendios(Kind::SmsLost, 2_000), &rules);
        record.apply(&sendios(Kind::SmsClick, 2_500), &rules);
        record.apply(&sendios(Kind::SmsLost, 3_000), &rules);
        record.apply(&sendios(Kind::SmsLost, 4_000), &rules);
        assert!(!record.suppressed(), "the click reset the streak");
        assert!(!record.apply(&sendios(Kind::SmsSent, 4_500), &rules));
        record.apply(&sendios(Kind::SmsLost, 5_000), &rules);
        assert!(record.suppressed());
        assert_eq!(
            record.since_ms(),
            Some(5_000),
            "since is the ts of the loss that crossed"
        );
        assert_eq!(record.reasons[0].kind, Kind::Undeliverable);

        record.apply(&unsubscribe("u", 6_000), &rules);
        assert!(record.apply(&sendios(Kind::SmsClick, 7_000), &rules));
        assert!(record.suppressed(), "a click never lifts an unsubscribe");
        assert_eq!(record.reasons.len(), 1);
        assert_eq!(record.reasons[0].kind, Kind::Unsubscribe);
        assert_eq!(record.lost_streak, 0);
    }

    fn manual(kind: Kind, at_ms: i64) -> Event {
        Event {
            kind,
            source: Source::Manual,
            ..unsubscribe(&format!("m{at_ms}"), at_ms)
        }
    }

    #[test]
    fn ordering_is_by_event_time_and_suppression_wins_ties() {
        let rules = Rules::default();
        let mut record = Record::default();
        record.apply(&unsubscribe("u1", 1_000), &rules);
        assert!(record.lift_needs_note());
        assert!(record.apply(&manual(Kind::Lift, 2_000), &rules));
        assert!(!record.suppressed());
        assert!(
            !record.apply(&unsubscribe("late retry", 1_000), &rules),
            "older than the lift"
        );
        assert!(!record.suppressed());
        assert!(
            record.apply(&unsubscribe("tie", 2_000), &rules),
            "a tie goes to suppression"
        );
        assert!(!record.apply(&manual(Kind::Lift, 2_000), &rules));
        assert!(
            record.suppressed(),
            "a lift at the same time does not remove it"
        );
        assert!(record.apply(&unsubscribe("new", 3_000), &rules));
        assert_eq!(record.reasons.len(), 2);
    }

    #[test]
    fn manual_and_undeliverable_reasons_lift_without_a_note() {
        let rules = Rules { lost_threshold: 1 };
        let mut record = Record::default();
        record.apply(&manual(Kind::Suppress, 1_000), &rules);
        record.apply(&sendios(Kind::SmsLost, 1_500), &rules);
        assert!(record.suppressed() && !record.lift_needs_note());
        assert!(record.apply(&manual(Kind::Lift, 2_000), &rules));
        assert!(!record.suppressed());
        assert_eq!(record.lost_streak, 0, "a lift resets the lost streak");
    }

    #[test]
    fn a_zero_threshold_disables_undeliverable() {
        let rules = Rules { lost_threshold: 0 };
        let mut record = Record::default();
        for t in 0..10 {
            record.apply(&sendios(Kind::SmsLost, t), &rules);
        }
        assert!(!record.suppressed());
        assert_eq!(record.lost_streak, 10);
    }

    #[test]
    fn encoding_round_trips_and_header_matches() {
        let mut record = Record::default();
        record.apply(&unsubscribe("a", 1_757_849_748_000), &Rules::default());
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes).ok(), Some(record.clone()));
        assert_eq!(decode_status(&bytes).ok(), Some(record.status()));
        let reasons: Vec<Reason> =
            serde_json::from_str(reasons_json(&bytes).expect("raw").get()).expect("reasons");
        assert_eq!(reasons, record.reasons);
        let empty = Record::default().encode();
        assert_eq!(decode_status(&empty).ok(), Some(Status::default()));
        assert!(decode_status(&bytes[..4]).is_err());
    }
}
