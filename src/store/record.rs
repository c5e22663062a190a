//! The suppression record of one subject and the rules that change it. Pure data and pure
//! functions: the committer feeds events through [`Record::apply`] and stores the result; nothing
//! here touches the disk.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::{Event, Kind, Source};

/// Stored value layouts. Both start with `[version][suppressed][since_ms: i64 BE]`, a fixed header
/// that lets a bulk check answer from ten bytes without parsing JSON. Version 1 continues with
/// the record's JSON. Version 2 continues with the JSON's length (u32 BE), the JSON, and then the
/// subject's first history entry, which the store keeps here rather than under a key of its own
/// (opaque to this module; see `store`). Both are read; version 1 is written for a record that
/// carries no history entry.
const PLAIN: u8 = 1;
const WITH_FIRST_EVENT: u8 = 2;
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
///
/// A record is a function of the *set* of its subject's events, whatever order they arrived in:
/// the rules take events in [`rule_order`] (event time, then kind and idempotency key). An
/// event later than every one before it is applied on top ([`Record::takes_next`]); one that is
/// not is placed by replaying the subject's events in that order ([`Record::replay`]). Two
/// nodes that received the same events in different orders so hold the same record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Events in force, earliest first; the subject is suppressed while there is any.
    pub reasons: Vec<Reason>,
    /// Receive time of the last event (in rule order) that changed the record.
    pub changed_at_ms: i64,
    /// Consecutive `sms_lost` events, in event-time order, since the last `sms_click`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_streak: u32,
    /// Event time of the latest lift with a note (evidence of renewed consent): suppressing
    /// events older than this lose to it, as late retries of what the person took back. A lift
    /// without a note ends operators' suppressions and undeliverability older than it, never a
    /// person's own unsubscribe, however its events are ordered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_at_ms: Option<i64>,
    /// The latest event time among the events whose order the rules depend on (all but
    /// `sms_sent` and `undeliverable`, see [`orders_rules`]): an event after it is applied on
    /// top, any other needs a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_ms: Option<i64>,
}

/// The order the rules take a subject's events in: event time; at the same time, the order a
/// message's own events happen in (sent, then lost or clicked; a click after a loss proves the
/// number reachable) and operators' changes after providers'; then the idempotency key, so
/// that every node orders the same set the same way.
pub fn rule_order(event: &Event) -> (i64, u8, &str) {
    let stage = match event.kind {
        Kind::SmsSent => 0,
        Kind::SmsLost => 1,
        Kind::SmsClick => 2,
        Kind::Unsubscribe | Kind::Undeliverable => 3,
        Kind::Suppress => 4,
        Kind::Lift => 5,
    };
    (event.event_time_ms, stage, &event.idempotency_key)
}

/// Whether an event's place among the others matters to the rules: `sms_sent` and
/// `undeliverable` events only go into the history (undeliverability comes from `sms_lost`
/// streaks).
fn orders_rules(kind: Kind) -> bool {
    !matches!(kind, Kind::SmsSent | Kind::Undeliverable)
}

/// Whether an operator's event carries a note, the evidence of consent a lift over a person's
/// own opt-out needs.
fn carries_note(event: &Event) -> bool {
    event
        .details
        .get("note")
        .and_then(Value::as_str)
        .is_some_and(|note| !note.trim().is_empty())
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

/// A new event the rules refuse to record, whatever the request that carries it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this suppression includes the person's own unsubscribe; lifting it needs a note with the evidence of renewed consent")]
    LiftNeedsNote,
}

impl Refusal {
    /// The request field the refusal is about.
    pub fn field(self) -> &'static str {
        match self {
            Refusal::LiftNeedsNote => "note",
        }
    }
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

    /// Whether `event` comes after every event this record was made of, so that applying it
    /// on top gives what a replay in rule order would. A record without `latest_ms` that is not
    /// empty was written before records kept it: only a replay can tell.
    pub fn takes_next(&self, event: &Event) -> bool {
        if !orders_rules(event.kind) {
            return true;
        }
        match self.latest_ms {
            Some(latest) => event.event_time_ms > latest,
            None => *self == Record::default(),
        }
    }

    /// The record `events` make, taken in [`rule_order`], and for each event (in the order
    /// given) whether it changed the record at its place.
    pub fn replay(events: &[&Event], rules: &Rules) -> (Record, Vec<bool>) {
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (events[a], events[b]);
            rule_order(a).cmp(&rule_order(b))
        });
        let mut record = Record::default();
        let mut applied = vec![false; events.len()];
        for i in order {
            applied[i] = record.apply(events[i], rules);
        }
        (record, applied)
    }

    /// Applies `event` as the latest so far (see [`Record::takes_next`]), returning whether the
    /// record changed.
    ///
    /// Order is by event time, not arrival: a suppressing event older than the latest lift
    /// loses to it (a late retry of an unsubscribe that the person has since revoked must not
    /// re-suppress), and at equal times suppression wins.
    pub fn apply(&mut self, event: &Event, rules: &Rules) -> bool {
        if orders_rules(event.kind) {
            self.latest_ms = Some(self.latest_ms.map_or(event.event_time_ms, |latest| {
                latest.max(event.event_time_ms)
            }));
        }
        match event.kind {
            Kind::Unsubscribe | Kind::Suppress if self.lifted_after(event.event_time_ms) => false,
            Kind::Unsubscribe | Kind::Suppress => self.add_reason(event, event.kind),
            Kind::SmsSent | Kind::Undeliverable => false,
            Kind::Lift => {
                let before = self.reasons.len();
                let consented = carries_note(event);
                // Only evidence of renewed consent ends a person's own opt-out: without it, an
                // unsubscribe stays whether it arrived before the lift or after.
                self.reasons.retain(|r| {
                    r.event_time_ms >= event.event_time_ms
                        || (!consented && r.kind == Kind::Unsubscribe)
                });
                let lifted_at = match (self.lifted_at_ms, consented) {
                    (Some(t), true) => Some(t.max(event.event_time_ms)),
                    (None, true) => Some(event.event_time_ms),
                    (lifted_at, false) => lifted_at,
                };
                let changed = before != self.reasons.len()
                    || self.lost_streak != 0
                    || self.lifted_at_ms != lifted_at;
                self.lost_streak = 0;
                self.lifted_at_ms = lifted_at;
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

    /// Whether the rules refuse `event` as a new event on this record. The committer asks this
    /// against the record as it plans the event, after every earlier event, so an unsubscribe
    /// that lands just before a lift is seen by it. Replays of the log do not ask: what was
    /// logged was accepted.
    pub fn refuses(&self, event: &Event) -> Option<Refusal> {
        (event.kind == Kind::Lift
            && self.suppressed()
            && self.lift_needs_note()
            && !carries_note(event))
        .then_some(Refusal::LiftNeedsNote)
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

    /// The stored value of this record, carrying the subject's `first_event` entry if given.
    pub fn encode(&self, first_event: Option<&[u8]>) -> Vec<u8> {
        let status = self.status();
        let mut out = Vec::with_capacity(256 + first_event.map_or(0, <[u8]>::len));
        out.push(if first_event.is_some() {
            WITH_FIRST_EVENT
        } else {
            PLAIN
        });
        out.push(u8::from(status.suppressed));
        out.extend_from_slice(&status.since_ms.unwrap_or(i64::MIN).to_be_bytes());
        let Some(first_event) = first_event else {
            // Serialising plain data into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, self);
            return out;
        };
        out.extend_from_slice(&[0; 4]);
        let _ = serde_json::to_writer(&mut out, self);
        let json_len = (out.len() - HEADER_LEN - 4) as u32;
        out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&json_len.to_be_bytes());
        out.extend_from_slice(first_event);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, CorruptRecord> {
        serde_json::from_slice(split(bytes)?.0).map_err(|e| CorruptRecord(e.to_string()))
    }
}

/// A stored record's JSON and the history entry it carries, if any.
fn split(bytes: &[u8]) -> Result<(&[u8], Option<&[u8]>), CorruptRecord> {
    let version = decode_header(bytes)?.0;
    let body = &bytes[HEADER_LEN..];
    if version == PLAIN {
        return Ok((body, None));
    }
    let too_short = || CorruptRecord(format!("{} bytes is shorter than its layout", bytes.len()));
    let (len, rest) = body.split_first_chunk::<4>().ok_or_else(too_short)?;
    let json_len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| too_short())?;
    if rest.len() < json_len {
        return Err(too_short());
    }
    let (json, first_event) = rest.split_at(json_len);
    Ok((json, Some(first_event)))
}

/// The subject's first history entry, if this stored record carries it.
pub fn first_event(bytes: &[u8]) -> Result<Option<&[u8]>, CorruptRecord> {
    Ok(split(bytes)?.1)
}

/// The stored reasons of a record as raw JSON, without parsing them into values.
pub fn reasons_json(bytes: &[u8]) -> Result<&serde_json::value::RawValue, CorruptRecord> {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        reasons: &'a serde_json::value::RawValue,
    }
    serde_json::from_slice::<Raw<'_>>(split(bytes)?.0)
        .map(|raw| raw.reasons)
        .map_err(|e| CorruptRecord(e.to_string()))
}

/// Reads only the fixed header of a stored record.
pub fn decode_status(bytes: &[u8]) -> Result<Status, CorruptRecord> {
    Ok(decode_header(bytes)?.1)
}

fn decode_header(bytes: &[u8]) -> Result<(u8, Status), CorruptRecord> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| CorruptRecord(format!("{} bytes is shorter than a header", bytes.len())))?;
    let version = header[0];
    if version != PLAIN && version != WITH_FIRST_EVENT {
        return Err(CorruptRecord(format!("unknown format version {version}")));
    }
    let mut since = [0u8; 8];
    since.copy_from_slice(&header[2..]);
    let since = i64::from_be_bytes(since);
    let status = Status {
        suppressed: header[1] != 0,
        since_ms: (since != i64::MIN).then_some(since),
    };
    Ok((version, status))
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

    fn event_of(kind: Kind, key: &str, at_ms: i64) -> Event {
        let mut event = unsubscribe(key, at_ms);
        event.kind = kind;
        event.source = match kind {
            Kind::SmsLost | Kind::SmsClick | Kind::SmsSent => Source::Sendios,
            Kind::Unsubscribe => Source::Lox24,
            _ => Source::Manual,
        };
        event
    }

    /// The heart of a cluster's convergence: whatever order the same events arrive in, a node
    /// that applies the latest on top and replays for any other ends with the same record.
    #[test]
    fn every_arrival_order_of_the_same_events_makes_the_same_record() {
        let rules = Rules { lost_threshold: 2 };
        let mut noted = event_of(Kind::Lift, "lift-noted", 5_000);
        noted.details.insert("note".into(), "consent form".into());
        let events = [
            event_of(Kind::Unsubscribe, "u1", 1_000),
            event_of(Kind::SmsLost, "l1", 2_000),
            event_of(Kind::SmsLost, "l2", 3_000),
            event_of(Kind::Lift, "lift-bare", 4_000),
            noted,
            event_of(Kind::SmsClick, "click", 6_000),
            event_of(Kind::Suppress, "manual", 4_000),
            event_of(Kind::SmsSent, "sent", 7_000),
        ];
        let all: Vec<&Event> = events.iter().collect();
        let (expected, _) = Record::replay(&all, &rules);
        let mut order: Vec<usize> = (0..events.len()).collect();
        let mut orders = 0;
        // Every permutation (Heap's algorithm), each applied as a node would.
        let mut counters = vec![0usize; order.len()];
        let mut check = |order: &[usize]| {
            let mut record = Record::default();
            let mut seen: Vec<&Event> = Vec::new();
            for &i in order {
                seen.push(&events[i]);
                if record.takes_next(&events[i]) {
                    record.apply(&events[i], &rules);
                } else {
                    record = Record::replay(&seen, &rules).0;
                }
            }
            assert_eq!(record, expected, "arrival order {order:?}");
            orders += 1;
        };
        check(&order);
        let mut i = 0;
        while i < order.len() {
            if counters[i] < i {
                let j = if i % 2 == 0 { 0 } else { counters[i] };
                order.swap(j, i);
                check(&order);
                counters[i] += 1;
                i = 0;
            } else {
                counters[i] = 0;
                i += 1;
            }
        }
        assert_eq!(orders, 40_320);
        assert!(
            !expected.suppressed(),
            "the noted lift ends everything before it"
        );
    }

    #[test]
    fn a_lift_without_a_note_never_ends_an_unsubscribe_in_any_order() {
        let rules = Rules::default();
        let unsubscribe_first = [unsubscribe("u", 1_000), event_of(Kind::Lift, "bare", 2_000)];
        let refs: Vec<&Event> = unsubscribe_first.iter().collect();
        assert!(Record::replay(&refs, &rules).0.suppressed());
        let refs: Vec<&Event> = unsubscribe_first.iter().rev().collect();
        assert!(Record::replay(&refs, &rules).0.suppressed());
        let manual_first = [
            event_of(Kind::Suppress, "m", 1_000),
            event_of(Kind::Lift, "bare", 2_000),
        ];
        let refs: Vec<&Event> = manual_first.iter().collect();
        assert!(!Record::replay(&refs, &rules).0.suppressed());
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

    fn lift_with_note(at_ms: i64) -> Event {
        let mut lift = manual(Kind::Lift, at_ms);
        lift.details.insert("note".into(), "consent form 17".into());
        lift
    }

    #[test]
    fn ordering_is_by_event_time_and_suppression_wins_ties() {
        let rules = Rules::default();
        let mut record = Record::default();
        record.apply(&unsubscribe("u1", 1_000), &rules);
        assert!(record.lift_needs_note());
        assert_eq!(
            record.refuses(&manual(Kind::Lift, 2_000)),
            Some(Refusal::LiftNeedsNote)
        );
        assert_eq!(record.refuses(&lift_with_note(2_000)), None);
        assert!(record.apply(&lift_with_note(2_000), &rules));
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
        assert!(!record.apply(&lift_with_note(2_000), &rules));
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
        assert_eq!(record.refuses(&manual(Kind::Lift, 2_000)), None);
        assert!(record.apply(&manual(Kind::Lift, 2_000), &rules));
        assert!(!record.suppressed());
        assert_eq!(record.lost_streak, 0, "a lift resets the lost streak");
    }

    #[test]
    fn an_opt_out_that_arrives_after_a_lift_without_a_note_counts_however_old() {
        let rules = Rules::default();
        let mut record = Record::default();
        record.apply(&manual(Kind::Suppress, 1_000), &rules);
        assert!(record.apply(&manual(Kind::Lift, 3_000), &rules));
        assert!(
            record.apply(&unsubscribe("sent before the lift", 2_000), &rules),
            "no consent covered this opt-out"
        );
        assert!(record.suppressed());
        assert_eq!(
            record.refuses(&manual(Kind::Lift, 4_000)),
            Some(Refusal::LiftNeedsNote)
        );
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
        for first in [None, Some(&b"{\"entry\":1}"[..])] {
            let bytes = record.encode(first);
            assert_eq!(Record::decode(&bytes).ok(), Some(record.clone()));
            assert_eq!(decode_status(&bytes).ok(), Some(record.status()));
            assert_eq!(first_event(&bytes).ok(), Some(first));
            let reasons: Vec<Reason> =
                serde_json::from_str(reasons_json(&bytes).expect("raw").get()).expect("reasons");
            assert_eq!(reasons, record.reasons);
            assert!(decode_status(&bytes[..4]).is_err());
            assert!(Record::decode(&bytes[..HEADER_LEN + 3]).is_err());
        }
        let empty = Record::default().encode(None);
        assert_eq!(decode_status(&empty).ok(), Some(Status::default()));
    }
}
