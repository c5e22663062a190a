//! Sendios batches (keyed object, array or single event).
#![no_main]

use libfuzzer_sys::fuzz_target;
use suppressd::providers::sendios;

fuzz_target!(|body: &[u8]| {
    let _ = sendios::parse(body, 1_700_000_000_000);
});
