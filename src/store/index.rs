//! An in-memory index of the suppressed phone numbers, for bulk checks at campaign scale.
//!
//! sled stays the source of truth; this is a derived view that the committer updates right after
//! every batch it applies, and that is rebuilt from sled at open (and when the database is
//! reopened after a storage failure). It maps the digits of a suppressed E.164 number (at most
//! 15, so they fit a `u64`) to its `since`; a number that is not in it is not suppressed.
//!
//! Memory per number is what the operator pays for every suppressed number, so the numbers live
//! in a sorted array (12 bytes per number: the digits and `since` in Unix seconds, which is all
//! an answer shows) rather than a hash map (36 bytes at its power-of-two capacity). Changes
//! first go to a small map of recent changes per shard, which is merged into the array once it
//! holds a sixteenth of it, so a change costs amortised O(1) copies and a lookup is one map
//! probe and one search of the array (see [`find`]).
//!
//! Sharded so that a bulk check and the committer never wait for each other for long: a merge
//! holds one shard, a sixty-fourth of the numbers.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::record::{decode_status, Status};

const SHARDS: usize = 64;
/// Recent changes a shard keeps unmerged at least, so that small lists are not re-sorted for
/// every change.
const MIN_RECENT: usize = 1024;

pub(super) struct PhoneIndex {
    shards: Vec<RwLock<Shard>>,
}

#[derive(Default)]
struct Shard {
    /// Suppressed numbers with their `since`, ascending by number and unique.
    entries: Vec<Entry>,
    /// The number of every [`SEGMENT`]th entry: a search reads these, which stay in the CPU's
    /// cache, to pick the segment, and then searches that segment only.
    samples: Vec<u64>,
    /// The `since` of entries marked [`FAR`].
    far: HashMap<u64, i64>,
    /// Changes not yet merged into `entries`: `Some(since)` suppressed, `None` lifted.
    recent: NumberMap<Option<i64>>,
    /// Numbers suppressed after `recent` is applied.
    suppressed: usize,
}

/// Entries per segment between two samples: 0.03 bytes of sample per number.
const SEGMENT: usize = 256;

/// Marks a `since` before 1970 or after 2106 (a provider's odd timestamp), kept exactly apart.
const FAR: u32 = u32::MAX;

/// A suppressed number (its digits, below 2⁵⁰) and its `since` in Unix seconds (or [`FAR`]),
/// side by side in 12 bytes: a lookup that finds the number has its `since` in the same cache
/// line, where two arrays cost a second read from memory (38 % of a bulk check's search).
#[derive(Clone, Copy)]
struct Entry([u32; 3]);

impl Entry {
    fn new(number: u64, secs: u32) -> Entry {
        Entry([number as u32, (number >> 32) as u32, secs])
    }

    fn number(self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }

    fn secs(self) -> u32 {
        self.0[2]
    }
}

/// The `since` of a stored phone record if it is suppressed: what the index keeps of it. Every
/// answer shows `since` in whole seconds, so that is all the index keeps, in 4 bytes.
pub(super) fn since_if_suppressed(value: &[u8]) -> Option<i64> {
    let status = decode_status(value).unwrap_or_default();
    let since_ms = status.since_ms.filter(|_| status.suppressed)?;
    Some(since_ms.div_euclid(1000).saturating_mul(1000))
}

/// The entry of `number` in the ascending `entries` (one segment of a shard). A binary search
/// of a shard was fourteen dependent reads scattered over memory the CPU does not cache (61 %
/// of a bulk check's time). Within a segment numbers are mostly evenly spread (a shard's are
/// not: country codes and number ranges make clusters, which the samples separate), so a guess
/// interpolated between the segment's ends and a look at the few entries around it usually
/// finds the place in a cache line or two. Where the guess misses, the range shrinks to the
/// side it missed on, and after a few guesses a binary search of what is left takes over.
fn find(entries: &[Entry], number: u64) -> Option<Entry> {
    const GUESSES: usize = 3;
    const AROUND: usize = 4;
    let (mut low, mut high) = (0, entries.len());
    for _ in 0..GUESSES {
        if high - low <= 4 * AROUND {
            break;
        }
        let (first, last) = (entries.get(low)?.number(), entries.get(high - 1)?.number());
        if number < first || number > last {
            return None;
        }
        let span = u128::from(last - first).max(1);
        let offset = u128::from(number - first) * (high - 1 - low) as u128 / span;
        let guess = low + usize::try_from(offset).unwrap_or(high - 1 - low);
        let (from, to) = (
            guess.saturating_sub(AROUND).max(low),
            (guess + AROUND + 1).min(high),
        );
        match (entries.get(from), entries.get(to - 1)) {
            (Some(start), _) if number < start.number() => high = from,
            (_, Some(end)) if number > end.number() => low = to,
            _ => {
                low = from;
                high = to;
                break;
            }
        }
    }
    let window = entries.get(low..high)?;
    let i = window
        .binary_search_by_key(&number, |entry| entry.number())
        .ok()?;
    window.get(i).copied()
}

/// A map keyed by phone digits. Probed on every lookup while changes wait to be merged, where
/// SipHash would cost more than the probe.
pub(super) type NumberMap<V> = HashMap<u64, V, BuildHasherDefault<NumberHasher>>;

/// Phone digits are their own good hash once mixed.
#[derive(Default)]
pub(super) struct NumberHasher(u64);

impl Hasher for NumberHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, number: u64) {
        self.0 = number;
    }
}

fn shard_of(number: u64) -> usize {
    // Numbers are dense in their low digits; mixing keeps shards even.
    let mixed = number.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 58) as usize % SHARDS
}

impl Shard {
    fn since(&self, number: u64) -> Option<i64> {
        match self.recent.get(&number) {
            Some(&change) => change,
            None => match find(self.segment(number)?, number)?.secs() {
                FAR => self.far.get(&number).copied(),
                secs => Some(i64::from(secs) * 1000),
            },
        }
    }

    /// The segment of `entries` that holds `number` if any does.
    fn segment(&self, number: u64) -> Option<&[Entry]> {
        let after = self.samples.partition_point(|&sample| sample <= number);
        let start = after.checked_sub(1)? * SEGMENT;
        let rest = self.entries.get(start..)?;
        Some(rest.get(..SEGMENT).unwrap_or(rest))
    }

    /// Appends an entry (its number greater than any in the array), keeping the samples.
    fn push_entry(&mut self, entry: Entry) {
        if self.entries.len() % SEGMENT == 0 {
            self.samples.push(entry.number());
        }
        self.entries.push(entry);
    }

    /// Appends `number` (greater than any in `entries`) with its `since`.
    fn push(&mut self, number: u64, since_ms: i64) {
        match u32::try_from(since_ms.div_euclid(1000)) {
            Ok(secs) if secs != FAR => self.push_entry(Entry::new(number, secs)),
            _ => {
                self.push_entry(Entry::new(number, FAR));
                self.far.insert(number, since_ms);
            }
        }
    }

    fn set(&mut self, number: u64, since_ms: Option<i64>) {
        let current = self.since(number);
        // Most writes (deliveries, repeated opt-outs) leave a number as it was.
        if current == since_ms {
            return;
        }
        match (current.is_some(), since_ms.is_some()) {
            (false, true) => self.suppressed += 1,
            (true, false) => self.suppressed -= 1,
            _ => {}
        }
        self.recent.insert(number, since_ms);
        if self.recent.len() > MIN_RECENT.max(self.entries.len() / 16) {
            self.merge();
        }
    }

    /// Folds the recent changes into a new array sized exactly, so that no capacity is left over.
    fn merge(&mut self) {
        let mut recent: Vec<(u64, Option<i64>)> =
            std::mem::take(&mut self.recent).into_iter().collect();
        recent.sort_unstable_by_key(|&(number, _)| number);
        let old = std::mem::replace(
            self,
            Shard {
                entries: Vec::with_capacity(self.suppressed),
                samples: Vec::with_capacity(self.suppressed.div_ceil(SEGMENT)),
                suppressed: self.suppressed,
                ..Shard::default()
            },
        );
        let mut kept = old.entries.iter().copied().peekable();
        for (number, change) in recent {
            while let Some(&entry) = kept.peek() {
                if entry.number() >= number {
                    break;
                }
                self.push_kept(&old, entry);
                kept.next();
            }
            if kept.peek().is_some_and(|entry| entry.number() == number) {
                kept.next();
            }
            if let Some(since) = change {
                self.push(number, since);
            }
        }
        for entry in kept {
            self.push_kept(&old, entry);
        }
    }

    /// Appends an entry of `old`, with its exact `since` if it is far.
    fn push_kept(&mut self, old: &Shard, entry: Entry) {
        self.push_entry(entry);
        if entry.secs() == FAR {
            if let Some(&since_ms) = old.far.get(&entry.number()) {
                self.far.insert(entry.number(), since_ms);
            }
        }
    }
}

fn read(shard: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    shard
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write(shard: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    shard
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PhoneIndex {
    pub fn new() -> Self {
        PhoneIndex {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    pub fn status(&self, number: u64) -> Status {
        let since_ms = read(&self.shards[shard_of(number)]).since(number);
        Status {
            suppressed: since_ms.is_some(),
            since_ms,
        }
    }

    /// Records the state of a phone record just written (`value` is the stored record).
    pub fn update(&self, number: u64, value: &[u8]) {
        write(&self.shards[shard_of(number)]).set(number, since_if_suppressed(value));
    }

    /// Takes over `other`'s contents, shard by shard: a reader sees each shard either as it was
    /// or as it is in `other`, never half-filled.
    pub fn replace(&self, other: PhoneIndex) {
        for (shard, new) in self.shards.iter().zip(other.shards) {
            *write(shard) = new.into_inner().unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| read(shard).suppressed).sum()
    }
}

/// Builds an index from every stored phone record, without the merge steps of `update`: records
/// come in key order, which for E.164 digits (no leading zero; shorter keys first) is ascending.
pub(super) struct IndexBuilder {
    shards: Vec<Shard>,
}

impl IndexBuilder {
    pub fn new() -> Self {
        IndexBuilder {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }

    pub fn add(&mut self, number: u64, value: &[u8]) {
        if let Some(since_ms) = since_if_suppressed(value) {
            self.add_since(number, since_ms);
        }
    }

    /// Adds a suppressed number; `since_ms` as [`since_if_suppressed`] gives it.
    pub fn add_since(&mut self, number: u64, since_ms: i64) {
        let shard = &mut self.shards[shard_of(number)];
        if shard
            .entries
            .last()
            .is_some_and(|last| last.number() >= number)
        {
            // Out of order (not expected from a key scan): an ordinary change keeps it right.
            shard.set(number, Some(since_ms));
            return;
        }
        shard.push(number, since_ms);
        shard.suppressed += 1;
    }

    pub fn build(self) -> PhoneIndex {
        PhoneIndex {
            shards: self
                .shards
                .into_iter()
                .map(|mut shard| {
                    // Folds in any out-of-order change and drops the capacity left by growth.
                    shard.merge();
                    RwLock::new(shard)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::{Reason, Record};

    fn suppressed_since(since_ms: i64) -> Vec<u8> {
        let mut record = Record::default();
        record.reasons.push(Reason {
            source: crate::event::Source::Lox24,
            kind: crate::event::Kind::Unsubscribe,
            event_id: None,
            event_time: since_ms / 1000,
            event_time_ms: since_ms,
            details: serde_json::Map::new(),
        });
        record.encode(None)
    }

    #[test]
    fn updates_follow_the_record() {
        let index = PhoneIndex::new();
        index.update(42, &Record::default().encode(None));
        assert_eq!(index.status(42), Status::default());
        index.update(42, &suppressed_since(7_000));
        assert_eq!(
            index.status(42),
            Status {
                suppressed: true,
                since_ms: Some(7_000)
            }
        );
        assert_eq!(index.len(), 1);
        index.update(42, &Record::default().encode(None));
        assert_eq!(index.len(), 0);
        assert_eq!(index.status(42), Status::default());
    }

    #[test]
    fn a_write_that_changes_nothing_adds_no_recent_change() {
        let index = PhoneIndex::new();
        for _ in 0..10 {
            index.update(42, &suppressed_since(7_000));
            index.update(43, &Record::default().encode(None));
        }
        let recent: usize = index.shards.iter().map(|s| read(s).recent.len()).sum();
        assert_eq!(recent, 1, "only 42's suppression is a change");
        assert_eq!(index.len(), 1);
    }

    /// Enough changes to merge every shard several times, checked against a plain map.
    #[test]
    fn merged_arrays_agree_with_a_map_through_many_changes() {
        let index = PhoneIndex::new();
        let mut expected = HashMap::new();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for step in 0..400_000i64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let number = 491_000_000_000 + state % 50_000;
            if state % 3 == 0 {
                index.update(number, &Record::default().encode(None));
                expected.remove(&number);
            } else {
                index.update(number, &suppressed_since(step));
                expected.insert(number, step.div_euclid(1000) * 1000);
            }
        }
        assert_eq!(index.len(), expected.len());
        for number in 491_000_000_000..491_000_050_000 {
            assert_eq!(
                index.status(number).since_ms,
                expected.get(&number).copied()
            );
        }
    }

    /// Numbers in far-apart clusters (country codes, ranges) would defeat a guess interpolated
    /// over a whole shard; every number must be found with its `since`, and no other.
    #[test]
    fn a_shard_finds_dense_and_clustered_numbers_as_a_binary_search_does() {
        let mut numbers: Vec<u64> = Vec::new();
        numbers.extend((0..3_000u64).map(|i| 12_025_550_000 + i * 3));
        numbers.extend((0..50u64).map(|i| 33_612_345_678 + i * 1_000_003));
        numbers.extend((0..9_000u64).map(|i| 4_915_112_345_678 + i * 7 + i % 5));
        numbers.extend((0..700u64).map(|i| 4_917_000_000_000 + i * i * 1_000));
        numbers.push(999_999_999_999_999);
        let mut shard = Shard::default();
        for (secs, &number) in (0i64..).zip(&numbers) {
            shard.push(number, secs * 1000);
        }
        assert_eq!(shard.samples.len(), numbers.len().div_ceil(SEGMENT));
        for (secs, &number) in (0i64..).zip(&numbers) {
            assert_eq!(shard.since(number), Some(secs * 1000), "{number}");
            for absent in [number + 1, number.saturating_sub(1)] {
                let expected = numbers.binary_search(&absent).ok().map(|i| i as i64 * 1000);
                assert_eq!(shard.since(absent), expected, "{absent}");
            }
        }
        assert_eq!(shard.since(0), None);
        assert_eq!(Shard::default().since(5), None);
        assert_eq!(find(&[Entry::new(5, 9)], 5).map(|e| e.secs()), Some(9));
    }

    #[test]
    fn since_is_kept_to_the_second_and_far_times_exactly_through_merges() {
        let far_future = i64::from(u32::MAX) * 1000 + 7_000;
        let mut builder = IndexBuilder::new();
        builder.add(1, &suppressed_since(1_757_849_748_999));
        builder.add(2, &suppressed_since(-5_500));
        builder.add(3, &suppressed_since(far_future));
        let index = builder.build();
        // Enough changes to merge every shard, so the far times are carried through merges.
        for number in 100..200_000 {
            index.update(number, &suppressed_since(1_000));
        }
        index.update(3, &suppressed_since(far_future));
        assert_eq!(index.status(1).since_ms, Some(1_757_849_748_000));
        assert_eq!(
            index.status(2).since_ms,
            Some(-6_000),
            "floored like ms_to_secs"
        );
        assert_eq!(index.status(3).since_ms, Some(far_future));
        assert_eq!(index.len(), 3 + 199_900);
        index.update(2, &Record::default().encode(None));
        for number in 200_000..400_000 {
            index.update(number, &suppressed_since(1_000));
        }
        assert_eq!(index.status(2).since_ms, None);
        assert_eq!(index.status(3).since_ms, Some(far_future));
        let far: usize = index.shards.iter().map(|s| read(s).far.len()).sum();
        assert_eq!(far, 1, "a lifted far time is dropped at the next merge");
    }

    #[test]
    fn a_built_index_answers_like_an_updated_one() {
        let mut builder = IndexBuilder::new();
        for number in (1_000..3_000u64).chain([2_500, 10]) {
            let value = if number % 7 == 0 {
                Record::default().encode(None)
            } else {
                suppressed_since(number as i64 * 1000)
            };
            builder.add(number, &value);
        }
        let index = builder.build();
        assert_eq!(index.status(10).since_ms, Some(10_000));
        assert_eq!(index.status(2_500).since_ms, Some(2_500_000));
        assert_eq!(index.status(1_001).since_ms, None);
        assert_eq!(index.status(3_000).since_ms, None);
        assert_eq!(
            index.len(),
            1 + (1_000..3_000).filter(|n| n % 7 != 0).count()
        );
    }
}
