//! The planner: what an event does to the tree, computed without writing anything, and the one
//! function that writes a plan to sled.
//!
//! A record is a replay of its subject's history through [`Record::apply`], so the same planner
//! serves three callers: the committer numbering new events, the catch-up that replays the log's
//! tail into a tree that stopped short of it, and the rebuild that replays a snapshot and the log
//! into an empty tree. Given the same events with the same sequence numbers it writes the same
//! keys and values, which is what makes sled a view that can always be rebuilt.
//!
//! Planning reads through every write planned but not yet in sled: earlier requests of the batch
//! and batches still on their way to the log ([`View::in_flight`]), so a redelivery is recognised
//! wherever its first delivery is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::history::{carried_entry, history_entries, parse_entry, KeyOfStoredEvent};
use super::hot::HotAnswers;
use super::index::{since_if_suppressed, IndexBuilder, PhoneIndex};
use super::keys::{
    entry_order, history_key, history_prefix, inline_entry, phone_of_record_key, record_key,
    seen_key, stamp_key, subject_key, Stamp,
};
use super::record::{self, Record, Rules};
use super::{Outcome, StoreError, StoredEvent};
use crate::event::{is_minted_idempotency_key, Event, Subject};

/// The writes of one batch, and the events they log, numbered from `first_seq`.
#[derive(Default)]
pub(super) struct Plan {
    writes: HashMap<Vec<u8>, Vec<u8>>,
    /// (subject key, idempotency key) of the planned events with minted keys, whose history
    /// entries a scan of the tree would not find yet.
    minted: HashSet<(Vec<u8>, String)>,
    /// Change in the number of suppressed accounts once these writes apply.
    suppressed_accounts: i64,
    /// Records these writes create.
    new_records: u64,
    pub first_seq: u64,
    /// The events that are new (duplicates are not logged), in sequence order.
    pub events: Vec<Event>,
}

impl Plan {
    pub fn starting_at(first_seq: u64) -> Plan {
        Plan {
            first_seq,
            ..Plan::default()
        }
    }

    /// The sequence number the next new event gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn writes_len(&self) -> usize {
        self.writes.len()
    }

    fn absorb(&mut self, other: Plan) {
        self.writes.extend(other.writes);
        self.minted.extend(other.minted);
        self.suppressed_accounts += other.suppressed_accounts;
        self.new_records += other.new_records;
        self.events.extend(other.events);
    }
}

/// The tree as it will be once every batch in flight is applied.
pub(super) struct View<'a> {
    /// `None` plans against an empty tree: for a rebuild's snapshot phase, whose subjects each
    /// come once with all their events, so nothing planned for one is ever read for another.
    pub tree: Option<&'a sled::Tree>,
    /// Oldest first.
    pub in_flight: &'a [Arc<Plan>],
}

impl View<'_> {
    fn get(&self, key: &[u8], nearer: [&Plan; 2]) -> Result<Option<Vec<u8>>, StoreError> {
        let planned = nearer
            .into_iter()
            .chain(self.in_flight.iter().rev().map(|p| &**p))
            .find_map(|plan| plan.writes.get(key));
        match planned {
            Some(value) => Ok(Some(value.clone())),
            None => match self.tree {
                Some(tree) => Ok(tree.get(key)?.map(|v| v.to_vec())),
                None => Ok(None),
            },
        }
    }

    fn minted(&self, planned: &(Vec<u8>, String), nearer: [&Plan; 2]) -> bool {
        nearer
            .into_iter()
            .chain(self.in_flight.iter().map(|p| &**p))
            .any(|plan| plan.minted.contains(planned))
    }
}

/// The in-memory views kept beside the tree: the phone index, the suppressed-account count, and
/// the answers to phone lookups asked for lately.
#[derive(Clone)]
pub(super) struct Views {
    pub phones: Arc<PhoneIndex>,
    pub suppressed_accounts: Arc<AtomicI64>,
    pub hot: Arc<HotAnswers>,
}

impl Views {
    /// Views that cache no lookup answers: for replays into trees nobody looks up.
    pub fn new() -> Views {
        Views::with_lookup_cache(0)
    }

    pub fn with_lookup_cache(bytes: u64) -> Views {
        Views {
            phones: Arc::new(PhoneIndex::new()),
            suppressed_accounts: Arc::new(AtomicI64::new(0)),
            hot: Arc::new(HotAnswers::new(bytes)),
        }
    }
}

/// Whether a planned event is new, and so subject to [`Record::refuses`], or one the log
/// already holds, which was accepted when it was logged.
#[derive(Clone, Copy)]
enum Check {
    Rules,
    Logged,
}

pub(super) struct Planner {
    pub rules: Rules,
}

impl Planner {
    /// Plans one request into `batch`, numbering its new events from `batch.next_seq()`. On
    /// error `batch` is left as it was: the request contributes nothing.
    pub fn plan(
        &self,
        view: &View,
        batch: &mut Plan,
        events: &[Event],
    ) -> Result<Vec<Outcome>, StoreError> {
        self.plan_request(view, batch, events, Check::Rules)
    }

    /// Plans events another node accepted (they came through the cluster's stream) like
    /// [`Planner::plan`], except that the intake rules that refuse a request were that node's
    /// to apply: an event it accepted is not refused here.
    pub fn plan_replicated(
        &self,
        view: &View,
        batch: &mut Plan,
        events: &[Event],
    ) -> Result<Vec<Outcome>, StoreError> {
        self.plan_request(view, batch, events, Check::Logged)
    }

    fn plan_request(
        &self,
        view: &View,
        batch: &mut Plan,
        events: &[Event],
        check: Check,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut mine = Plan::starting_at(batch.next_seq());
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            let seq = mine.next_seq();
            outcomes.push(self.plan_event(view, batch, &mut mine, event, seq, check)?);
        }
        batch.absorb(mine);
        Ok(outcomes)
    }

    /// Plans an event the log already numbered, as a catch-up or a rebuild replays it.
    pub fn replay(
        &self,
        view: &View,
        batch: &mut Plan,
        seq: u64,
        event: &Event,
    ) -> Result<(), StoreError> {
        let mut mine = Plan::starting_at(seq);
        let outcome = self.plan_event(view, batch, &mut mine, event, seq, Check::Logged)?;
        if outcome == Outcome::Duplicate {
            // The log holds only new events; an earlier one with the same key wins, as it did.
            tracing::warn!(
                seq,
                key = %event.idempotency_key,
                "a logged event repeats an earlier one's idempotency key; it is skipped"
            );
            return Ok(());
        }
        batch.writes.extend(mine.writes);
        batch.minted.extend(mine.minted);
        batch.suppressed_accounts += mine.suppressed_accounts;
        batch.new_records += mine.new_records;
        Ok(())
    }

    fn plan_event(
        &self,
        view: &View,
        batch: &Plan,
        mine: &mut Plan,
        event: &Event,
        seq: u64,
        check: Check,
    ) -> Result<Outcome, StoreError> {
        let subject = subject_key(&event.subject);
        let record_key = record_key(&subject);
        let stored_record = view.get(&record_key, [mine, batch])?;
        if has_seen(
            view,
            [mine, batch],
            event,
            &subject,
            stored_record.as_deref(),
        )? {
            return Ok(Outcome::Duplicate);
        }
        let mut record = match &stored_record {
            Some(bytes) => Record::decode(bytes)?,
            None => Record::default(),
        };
        if let (Check::Rules, Some(refusal)) = (check, record.refuses(event)) {
            return Err(refusal.into());
        }
        let was_suppressed = record.suppressed();
        let (applied, rewrites_record) = if record.takes_next(event) {
            let latest = record.latest_ms;
            let applied = record.apply(event, &self.rules);
            (applied, applied || record.latest_ms != latest)
        } else {
            // Earlier than an event the record already took: the rules take the subject's
            // events in order, so they are replayed with this one in its place.
            let earlier = subject_events(view, [mine, batch], &subject, stored_record.as_deref())?;
            let mut events: Vec<&Event> = earlier.iter().collect();
            events.push(event);
            let (replayed, applied) = Record::replay(&events, &self.rules);
            let rewrites_record = replayed != record;
            record = replayed;
            (applied.last().copied().unwrap_or(false), rewrites_record)
        };
        let order = entry_order(event.event_time_ms, seq);
        let stored = StoredEvent {
            event: event.clone(),
            applied,
        };
        let stored = serde_json::to_vec(&stored).map_err(StoreError::CorruptHistory)?;
        // The event that creates a record travels in it: most subjects (every imported number)
        // never have another, and a key of their own would double the keys sled keeps pages and
        // memory for.
        let creates_record = rewrites_record && stored_record.is_none();
        let entry_key = if creates_record {
            record_key.clone()
        } else {
            history_key(&subject, &order)
        };
        remember(mine, event, subject, &entry_key);
        if rewrites_record {
            if matches!(event.subject, Subject::Account { .. }) {
                mine.suppressed_accounts +=
                    i64::from(record.suppressed()) - i64::from(was_suppressed);
            }
            let first_event = match &stored_record {
                None => Some(inline_entry(&order, &stored)),
                Some(bytes) => record::first_event(bytes)?.map(<[u8]>::to_vec),
            };
            mine.writes
                .insert(record_key, record.encode(first_event.as_deref()));
            mine.new_records += u64::from(creates_record);
        }
        if !creates_record {
            mine.writes.insert(entry_key, stored);
        }
        mine.events.push(event.clone());
        Ok(if applied {
            Outcome::Applied
        } else {
            Outcome::Recorded
        })
    }
}

/// Every event of the subject so far: the one its record carries, and those under history keys
/// of their own, in the tree or in plans not written yet.
fn subject_events(
    view: &View,
    nearer: [&Plan; 2],
    subject: &[u8],
    record: Option<&[u8]>,
) -> Result<Vec<Event>, StoreError> {
    let prefix = history_prefix(subject);
    let mut keyed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    if let Some(tree) = view.tree {
        for entry in tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            keyed.insert(key.to_vec(), value.to_vec());
        }
    }
    let [mine, batch] = nearer;
    for plan in view.in_flight.iter().map(|p| &**p).chain([batch, mine]) {
        for (key, value) in &plan.writes {
            if key.starts_with(&prefix) {
                keyed.insert(key.clone(), value.clone());
            }
        }
    }
    let mut events = Vec::with_capacity(keyed.len() + 1);
    if let Some(record) = record {
        if let Some((_, stored)) = carried_entry::<StoredEvent>(record)? {
            events.push(stored.event);
        }
    }
    for value in keyed.values() {
        events.push(parse_entry::<StoredEvent>(value)?.event);
    }
    Ok(events)
}

/// Whether `event`'s idempotency key was recorded before. A key suppressd minted is looked for
/// in the subject's history (see [`is_minted_idempotency_key`]); any other has a key of its own.
fn has_seen(
    view: &View,
    nearer: [&Plan; 2],
    event: &Event,
    subject: &[u8],
    record: Option<&[u8]>,
) -> Result<bool, StoreError> {
    let key = &event.idempotency_key;
    if !is_minted_idempotency_key(key) {
        return Ok(view.get(&seen_key(key), nearer)?.is_some());
    }
    if view.minted(&(subject.to_vec(), key.clone()), nearer) {
        return Ok(true);
    }
    let Some(tree) = view.tree else {
        // Only this subject's planned events exist, and `minted` has every one of them.
        return Ok(false);
    };
    for stored in history_entries::<KeyOfStoredEvent>(tree, subject, record)? {
        if stored?.1.idempotency_key == *key {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Plans what makes [`has_seen`] find `event` from now on; `entry_key` is where its history
/// entry is stored.
fn remember(plan: &mut Plan, event: &Event, subject: Vec<u8>, entry_key: &[u8]) {
    let key = &event.idempotency_key;
    if is_minted_idempotency_key(key) {
        plan.minted.insert((subject, key.clone()));
    } else {
        plan.writes.insert(seen_key(key), entry_key.to_vec());
    }
}

/// Writes `plans` (in order: a later write of a key wins) to the tree as one atomic batch with
/// the stamp that says the tree now holds every event up to `applied`, and brings the in-memory
/// views along.
pub(super) fn write(
    tree: &sled::Tree,
    views: &Views,
    plans: &[&Plan],
    stamp: &mut Stamp,
    applied: u64,
) -> Result<(), sled::Error> {
    write_plans(tree, views, plans, stamp, Some(applied))
}

/// What a rebuild wrote, gathered as it goes so that it need not scan the tree afterwards: the
/// records it created, the change in suppressed accounts, and every phone record's `since`
/// (`None`: not suppressed) in the order written, so that the last write of a number wins.
#[derive(Default)]
pub(super) struct Tally {
    pub records: u64,
    pub suppressed_accounts: i64,
    pub phones: Vec<(u64, Option<i64>)>,
}

impl Tally {
    /// The phone index of the numbers whose last written record is suppressed.
    pub fn phone_index(mut self) -> PhoneIndex {
        // Stable, so that among one number's writes the last stays last.
        self.phones.sort_by_key(|&(number, _)| number);
        let mut builder = IndexBuilder::new();
        let mut writes = self.phones.into_iter().peekable();
        while let Some((number, since_ms)) = writes.next() {
            let superseded = writes.peek().is_some_and(|&(next, _)| next == number);
            if let (false, Some(since_ms)) = (superseded, since_ms) {
                builder.add_since(number, since_ms);
            }
        }
        builder.build()
    }
}

/// Writes a plan for a rebuild: key by key rather than as one sled batch, whose lock would stall
/// a planner reading the tree meanwhile, and without the stamp, which a rebuilt tree gets only
/// once it is whole (a crash before leaves no stamp, and the next start rebuilds again).
pub(super) fn insert_unstamped(
    tree: &sled::Tree,
    plan: &Plan,
    tally: &mut Tally,
) -> Result<(), sled::Error> {
    // In key order, as a batch would be: neighbouring keys share sled's pages.
    let mut writes: Vec<(&Vec<u8>, &Vec<u8>)> = plan.writes.iter().collect();
    writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (key, value) in writes {
        if let Some(number) = phone_of_record_key(key) {
            tally.phones.push((number, since_if_suppressed(value)));
        }
        tree.insert(key.as_slice(), value.as_slice())?;
    }
    tally.records += plan.new_records;
    tally.suppressed_accounts += plan.suppressed_accounts;
    Ok(())
}

fn write_plans(
    tree: &sled::Tree,
    views: &Views,
    plans: &[&Plan],
    stamp: &mut Stamp,
    applied: Option<u64>,
) -> Result<(), sled::Error> {
    let mut next = Stamp {
        applied: applied.unwrap_or(stamp.applied),
        records: stamp.records,
    };
    let mut batch = sled::Batch::default();
    let mut phones: HashMap<u64, &[u8]> = HashMap::new();
    let mut accounts = 0;
    for plan in plans {
        for (key, value) in &plan.writes {
            if let Some(number) = phone_of_record_key(key) {
                phones.insert(number, value);
            }
            batch.insert(key.as_slice(), value.as_slice());
        }
        accounts += plan.suppressed_accounts;
        next.records += plan.new_records;
    }
    if applied.is_some() {
        batch.insert(stamp_key(), &next.encode()[..]);
    }
    tree.apply_batch(batch)?;
    for (number, value) in phones {
        views.phones.update(number, value);
        views.hot.evict(number);
    }
    views
        .suppressed_accounts
        .fetch_add(accounts, Ordering::Relaxed);
    *stamp = next;
    Ok(())
}

/// Every key and value of a tree, in order: what two trees are compared by in tests.
#[cfg(test)]
pub(super) fn dump(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv.expect("entry");
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Source};
    use crate::store::Refusal;

    fn event(phone: &str, source: Source, kind: Kind, key: &str, time_ms: i64) -> Event {
        Event {
            subject: Subject::Phone {
                phone: phone.into(),
            },
            source,
            kind,
            idempotency_key: key.into(),
            event_id: None,
            event_time_ms: time_ms,
            receive_time_ms: time_ms,
            details: Default::default(),
        }
    }

    fn lift_with_note(phone: &str, key: &str, time_ms: i64) -> Event {
        let mut lift = event(phone, Source::Manual, Kind::Lift, key, time_ms);
        lift.details.insert("note".into(), "consent form 17".into());
        lift
    }

    #[test]
    fn a_lift_without_a_note_is_refused_over_an_unsubscribe_still_in_flight() {
        let planner = Planner {
            rules: Rules::default(),
        };
        let (_dir, tree) = tree();
        let phone = "+4930100005";
        let mut first = Plan::starting_at(1);
        let view = View {
            tree: Some(&tree),
            in_flight: &[],
        };
        planner
            .plan(
                &view,
                &mut first,
                &[event(phone, Source::Manual, Kind::Suppress, "manual:1", 1)],
            )
            .expect("suppress");
        // The unsubscribe is planned but neither logged nor in sled when the lift is planned.
        let mut second = Plan::starting_at(first.next_seq());
        planner
            .plan(
                &view,
                &mut second,
                &[event(phone, Source::Lox24, Kind::Unsubscribe, "lox24:2", 2)],
            )
            .expect("unsubscribe");
        let in_flight = [Arc::new(first), Arc::new(second)];
        let view = View {
            tree: Some(&tree),
            in_flight: &in_flight,
        };
        let mut third = Plan::starting_at(in_flight[1].next_seq());
        let lift = event(phone, Source::Manual, Kind::Lift, "manual:3", 3);
        let refused = planner.plan(&view, &mut third, std::slice::from_ref(&lift));
        assert!(
            matches!(refused, Err(StoreError::Refused(Refusal::LiftNeedsNote))),
            "{refused:?}"
        );
        assert!(
            third.is_empty() && third.events.is_empty(),
            "nothing planned"
        );
        planner
            .plan(&view, &mut third, &[lift_with_note(phone, "manual:4", 3)])
            .expect("a lift with a note");
        assert_eq!(third.events.len(), 1);
    }

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .temporary(true)
            .open()
            .expect("sled");
        let tree = db.open_tree("t").expect("tree");
        (dir, tree)
    }

    fn status(tree: &sled::Tree, phone: &str) -> bool {
        let key = record_key(&subject_key(&Subject::Phone {
            phone: phone.into(),
        }));
        tree.get(key)
            .expect("get")
            .map(|v| record::decode_status(&v).expect("status").suppressed)
            .unwrap_or(false)
    }

    #[test]
    fn numbers_only_new_events_and_sees_through_batches_in_flight() {
        let (_dir, tree) = tree();
        let planner = Planner {
            rules: Rules::default(),
        };
        let views = Views::new();
        let unsub = event(
            "+4930100001",
            Source::Lox24,
            Kind::Unsubscribe,
            "lox24:1",
            10,
        );
        let mut first = Plan::starting_at(1);
        let view = View {
            tree: Some(&tree),
            in_flight: &[],
        };
        let outcomes = planner
            .plan(&view, &mut first, &[unsub.clone(), unsub.clone()])
            .expect("plan");
        assert_eq!(outcomes, [Outcome::Applied, Outcome::Duplicate]);
        assert_eq!((first.first_seq, first.next_seq()), (1, 2));

        // Not yet written: the next batch still finds the first delivery.
        let in_flight = [Arc::new(first)];
        let view = View {
            tree: Some(&tree),
            in_flight: &in_flight,
        };
        let mut second = Plan::starting_at(in_flight[0].next_seq());
        let again = planner.plan(&view, &mut second, &[unsub]).expect("plan");
        assert_eq!(again, [Outcome::Duplicate]);
        assert!(second.events.is_empty());

        let mut stamp = Stamp::default();
        let applied = second.next_seq() - 1;
        write(
            &tree,
            &views,
            &[&in_flight[0], &second],
            &mut stamp,
            applied,
        )
        .expect("write");
        assert_eq!(
            stamp,
            Stamp {
                applied: 1,
                records: 1
            }
        );
        assert!(status(&tree, "+4930100001"));
        assert_eq!(views.phones.len(), 1);
        let stored = tree.get(stamp_key()).expect("get").expect("stamp");
        assert_eq!(Stamp::decode(&stored), Some(stamp));
    }

    #[test]
    fn a_replay_writes_what_the_first_plan_wrote() {
        let planner = Planner {
            rules: Rules::default(),
        };
        let events = [
            event(
                "+4930100002",
                Source::Sendios,
                Kind::SmsLost,
                "sendios:1",
                5,
            ),
            event(
                "+4930100002",
                Source::Lox24,
                Kind::Unsubscribe,
                "lox24:2",
                3,
            ),
            lift_with_note("+4930100002", "manual:3", 7),
            event(
                "+4930100003",
                Source::Lox24,
                Kind::Unsubscribe,
                "lox24:4",
                1,
            ),
        ];
        let (_a, original) = tree();
        let mut plan = Plan::starting_at(40);
        let view = View {
            tree: Some(&original),
            in_flight: &[],
        };
        planner.plan(&view, &mut plan, &events).expect("plan");
        let applied = plan.next_seq() - 1;
        write(
            &original,
            &Views::new(),
            &[&plan],
            &mut Stamp::default(),
            applied,
        )
        .expect("write");

        let (_b, rebuilt) = tree();
        let view = View {
            tree: Some(&rebuilt),
            in_flight: &[],
        };
        // One event at a time and each written at once, as a catch-up in small batches would.
        let mut stamp = Stamp::default();
        for (seq, event) in (40..).zip(&plan.events) {
            let mut one = Plan::starting_at(seq);
            planner.replay(&view, &mut one, seq, event).expect("replay");
            write(&rebuilt, &Views::new(), &[&one], &mut stamp, seq).expect("write");
        }
        assert_eq!(dump(&original), dump(&rebuilt));
        assert!(!status(&rebuilt, "+4930100002"), "lifted");
        assert!(status(&rebuilt, "+4930100003"));
    }
}
