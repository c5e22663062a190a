//! The answers to phone lookups asked for lately, kept in memory as the API rendered them from
//! the phone's record, so that a number looked up again is answered without walking sled's tree,
//! decoding the record or rendering JSON (together most of a suppressed lookup's time in user
//! space). Campaigns check the same numbers again and again.
//!
//! What is kept is opaque bytes: the store does not know the API's format, and the API never sees
//! sled's. Bounded by bytes (`--lookup-cache-mb`): a shard that would outgrow its share is
//! emptied and starts over, which keeps memory flat without bookkeeping per entry. Never stale:
//! every write of a phone record evicts its answer ([`HotAnswers::evict`], from the one function
//! that writes plans to sled, after the write), and a reader keeps what it rendered only if no
//! eviction of that shard happened since before its read ([`HotAnswers::generation`]), so a record
//! read just before a write cannot be kept after the write's eviction.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use super::index::NumberMap;

const SHARDS: usize = 64;
/// What an entry costs beside its bytes: the map's slot (key and `Bytes`) and the shared
/// buffer's header.
const ENTRY_OVERHEAD: usize = 72;

pub(super) struct HotAnswers {
    shards: Vec<Mutex<Shard>>,
    bytes_per_shard: usize,
}

#[derive(Default)]
struct Shard {
    answers: NumberMap<Bytes>,
    bytes: usize,
    /// Bumped by every eviction from this shard.
    generation: u64,
}

impl HotAnswers {
    /// A cache of at most `bytes`; 0 keeps nothing.
    pub fn new(bytes: u64) -> HotAnswers {
        HotAnswers {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            bytes_per_shard: usize::try_from(bytes).unwrap_or(usize::MAX) / SHARDS,
        }
    }

    pub fn get(&self, number: u64) -> Option<Bytes> {
        if self.bytes_per_shard == 0 {
            return None;
        }
        self.shard(number).answers.get(&number).cloned()
    }

    /// Taken before reading sled; [`HotAnswers::insert`] keeps the answer only if no write of
    /// the shard came in between.
    pub fn generation(&self, number: u64) -> u64 {
        if self.bytes_per_shard == 0 {
            return 0;
        }
        self.shard(number).generation
    }

    pub fn insert(&self, number: u64, generation: u64, answer: Bytes) {
        let cost = answer.len() + ENTRY_OVERHEAD;
        if cost > self.bytes_per_shard {
            return;
        }
        let mut shard = self.shard(number);
        if shard.generation != generation {
            return;
        }
        if shard.bytes + cost > self.bytes_per_shard {
            shard.answers.clear();
            shard.answers.shrink_to_fit();
            shard.bytes = 0;
        }
        if let Some(old) = shard.answers.insert(number, answer) {
            shard.bytes -= old.len() + ENTRY_OVERHEAD;
        }
        shard.bytes += cost;
    }

    /// Called after a phone's record was written.
    pub fn evict(&self, number: u64) {
        if self.bytes_per_shard == 0 {
            return;
        }
        let mut shard = self.shard(number);
        shard.generation += 1;
        if let Some(old) = shard.answers.remove(&number) {
            shard.bytes -= old.len() + ENTRY_OVERHEAD;
        }
    }

    /// Forgets everything: the database was reopened or rebuilt.
    pub fn clear(&self) {
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.generation += 1;
            shard.answers = NumberMap::default();
            shard.bytes = 0;
        }
    }

    fn shard(&self, number: u64) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_of(number)])
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn shard_of(number: u64) -> usize {
    (number.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_from_before_an_eviction_is_not_kept() {
        let hot = HotAnswers::new(1 << 20);
        let before = hot.generation(7);
        hot.evict(7);
        hot.insert(7, before, Bytes::from_static(b"old answer"));
        assert!(hot.get(7).is_none(), "a record read before the write");
        let now = hot.generation(7);
        hot.insert(7, now, Bytes::from_static(b"new answer"));
        assert_eq!(hot.get(7).as_deref(), Some(&b"new answer"[..]));
        hot.evict(7);
        assert!(hot.get(7).is_none());
    }

    #[test]
    fn a_full_shard_starts_over_and_memory_stays_bounded() {
        let hot = HotAnswers::new((SHARDS * 1000) as u64);
        let value = Bytes::from(vec![0u8; 100]);
        // Every number lands in some shard; far more than fit overall.
        for number in 0..10_000u64 {
            let generation = hot.generation(number);
            hot.insert(number, generation, value.clone());
        }
        for shard in &hot.shards {
            assert!(lock(shard).bytes <= 1000);
        }
        let kept = (0..10_000u64).filter(|&n| hot.get(n).is_some()).count();
        assert!(kept > 0 && kept <= SHARDS * 1000 / (100 + ENTRY_OVERHEAD));
        assert!(HotAnswers::new(0).get(1).is_none());
    }
}
