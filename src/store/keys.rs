//! The byte layout of the `suppressions` tree's keys, and of the small values that only say
//! where something is. Pure functions: nothing here touches sled.
//!
//! The tree is split into key spaces by a one-byte tag:
//! - `R` ‖ subject → the subject's record (see [`super::record`]);
//! - `H` ‖ subject ‖ [`EntryOrder`] → a history entry the record does not carry;
//! - `I` ‖ idempotency key → the key of that event's history entry (provider keys only);
//! - `M` ‖ name → the store's own bookkeeping, such as the [`Stamp`].
//!
//! A subject is `p` ‖ len ‖ E.164 for a phone, or `a` ‖ len ‖ scope ‖ len ‖ account for an
//! account; each part carries its length, so no subject's key is a prefix of another's and a
//! history prefix scan is exact.

use super::record::CorruptRecord;
use crate::event::Subject;

pub const RECORD: u8 = b'R';
pub const HISTORY: u8 = b'H';
pub const SEEN: u8 = b'I';
const META: u8 = b'M';

/// The key of the [`Stamp`].
pub fn stamp_key() -> Vec<u8> {
    tagged(META, b"applied", 0)
}

/// How far the tree got, written in the same atomic batch as every change: the sequence number
/// of the last log event applied, and how many records (`R` keys) the tree then holds. The
/// count lets an open that scans every record anyway notice a tree that lost some.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    pub applied: u64,
    pub records: u64,
}

impl Stamp {
    pub fn encode(&self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.applied.to_be_bytes());
        bytes[8..].copy_from_slice(&self.records.to_be_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<Stamp> {
        let (applied, records) = bytes.split_first_chunk::<8>()?;
        let records: [u8; 8] = records.try_into().ok()?;
        Some(Stamp {
            applied: u64::from_be_bytes(*applied),
            records: u64::from_be_bytes(records),
        })
    }
}

/// The key of a subject in every key space.
pub fn subject_key(subject: &Subject) -> Vec<u8> {
    match subject {
        Subject::Phone { phone } => {
            let mut key = Vec::with_capacity(phone.len() + 2);
            key.push(b'p');
            key.push(u8::try_from(phone.len()).unwrap_or(u8::MAX));
            key.extend_from_slice(phone.as_bytes());
            key
        }
        Subject::Account { scope, account } => {
            let mut key = Vec::with_capacity(scope.len() + account.len() + 5);
            key.push(b'a');
            for part in [scope, account] {
                // Parsers cap ids at MAX_ID_BYTES, far below u16::MAX.
                let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
                key.extend_from_slice(&len.to_be_bytes());
                key.extend_from_slice(&part.as_bytes()[..usize::from(len)]);
            }
            key
        }
    }
}

/// The subject a subject key encodes; the inverse of [`subject_key`].
pub fn subject_from_key(key: &[u8]) -> Option<Subject> {
    match key.split_first()? {
        (b'p', rest) => {
            let (&len, phone) = rest.split_first()?;
            (phone.len() == usize::from(len)).then_some(())?;
            Some(Subject::Phone {
                phone: String::from_utf8(phone.to_vec()).ok()?,
            })
        }
        (b'a', rest) => {
            let (scope, rest) = length_prefixed(rest)?;
            let (account, rest) = length_prefixed(rest)?;
            rest.is_empty()
                .then_some(Subject::Account { scope, account })
        }
        _ => None,
    }
}

fn length_prefixed(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    let part = bytes.get(2..2 + len)?;
    Some((
        String::from_utf8(part.to_vec()).ok()?,
        bytes.get(2 + len..)?,
    ))
}

pub fn tagged(tag: u8, rest: &[u8], capacity: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len() + capacity);
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

pub fn record_key(subject_key: &[u8]) -> Vec<u8> {
    tagged(RECORD, subject_key, 0)
}

pub fn seen_key(idempotency_key: &str) -> Vec<u8> {
    tagged(SEEN, idempotency_key.as_bytes(), 0)
}

pub fn history_prefix(subject_key: &[u8]) -> Vec<u8> {
    tagged(HISTORY, subject_key, 0)
}

/// The number of a phone record's key (`R` ‖ `p` ‖ len ‖ E.164).
pub fn phone_of_record_key(key: &[u8]) -> Option<u64> {
    let phone = key.strip_prefix(&[RECORD, b'p'])?.get(1..)?;
    crate::phone::e164_digits(std::str::from_utf8(phone).ok()?)
}

/// Where a history entry sorts within its subject: event time (order-preserving) ‖ sequence.
/// The sequence is the event's number in the log, so events of the same millisecond keep their
/// arrival order and a rebuild writes every entry under the key it had.
pub type EntryOrder = [u8; 16];

pub fn entry_order(event_time_ms: i64, sequence: u64) -> EntryOrder {
    let mut order = [0; 16];
    // Flipping the sign bit makes the big-endian bytes of an i64 sort like the number.
    order[..8].copy_from_slice(&((event_time_ms as u64) ^ (1 << 63)).to_be_bytes());
    order[8..].copy_from_slice(&sequence.to_be_bytes());
    order
}

pub fn sequence_of(order: &EntryOrder) -> u64 {
    let mut sequence = [0; 8];
    sequence.copy_from_slice(&order[8..]);
    u64::from_be_bytes(sequence)
}

pub fn history_key(subject_key: &[u8], order: &EntryOrder) -> Vec<u8> {
    let mut key = tagged(HISTORY, subject_key, order.len());
    key.extend_from_slice(order);
    key
}

pub fn subject_of_history_key(key: &[u8]) -> Result<&[u8], CorruptRecord> {
    key.len()
        .checked_sub(std::mem::size_of::<EntryOrder>())
        .and_then(|end| key.get(1..end))
        .ok_or_else(|| CorruptRecord::key(key))
}

pub fn order_of_history_key(key: &[u8]) -> Result<EntryOrder, CorruptRecord> {
    key.last_chunk::<16>()
        .copied()
        .ok_or_else(|| CorruptRecord::key(key))
}

/// A subject's first history entry as its record carries it: its order, then its JSON.
pub fn inline_entry(order: &EntryOrder, json: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(order.len() + json.len());
    entry.extend_from_slice(order);
    entry.extend_from_slice(json);
    entry
}

pub fn split_inline_entry(entry: &[u8]) -> Result<(EntryOrder, &[u8]), CorruptRecord> {
    let (order, json) = entry
        .split_first_chunk::<16>()
        .ok_or_else(|| CorruptRecord::key(entry))?;
    Ok((*order, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_keys_are_prefix_free() {
        let short = subject_key(&Subject::Phone {
            phone: "+491234567".into(),
        });
        let long = subject_key(&Subject::Phone {
            phone: "+4912345678".into(),
        });
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn subject_keys_decode_back() {
        for subject in [
            Subject::Phone {
                phone: "+4930123456".into(),
            },
            Subject::Account {
                scope: "tencent:@TOA#x".into(),
                account: "jared".into(),
            },
        ] {
            assert_eq!(subject_from_key(&subject_key(&subject)), Some(subject));
        }
        assert_eq!(subject_from_key(b"p\x05+49"), None);
    }

    #[test]
    fn account_keys_are_prefix_free() {
        let account = |scope: &str, account: &str| {
            subject_key(&Subject::Account {
                scope: scope.into(),
                account: account.into(),
            })
        };
        assert!(!account("tencent:a", "bc").starts_with(&account("tencent:a", "b")));
        assert_ne!(account("tencent:ab", "c"), account("tencent:a", "bc"));
    }

    #[test]
    fn history_keys_sort_by_event_time() {
        let subject = subject_key(&Subject::Phone {
            phone: "+491234567".into(),
        });
        let early = history_key(&subject, &entry_order(-5, 9));
        let later = history_key(&subject, &entry_order(3, 1));
        let latest = history_key(&subject, &entry_order(3, 2));
        assert!(early < later && later < latest);
    }

    #[test]
    fn the_stamp_round_trips_and_sits_apart_from_subjects() {
        let stamp = Stamp {
            applied: 42,
            records: 7,
        };
        assert_eq!(Stamp::decode(&stamp.encode()), Some(stamp));
        assert_eq!(Stamp::decode(&[1, 2, 3]), None);
        for tag in [RECORD, HISTORY, SEEN] {
            assert!(!stamp_key().starts_with(&[tag]));
        }
    }
}
