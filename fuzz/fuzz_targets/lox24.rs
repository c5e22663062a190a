//! LOX24 payloads: any bytes give a delivery or a PayloadError, never a panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use suppressd::phone::Normalizer;
use suppressd::providers::lox24;

static PHONES: LazyLock<Normalizer> = LazyLock::new(|| match Normalizer::new(Some("DE")) {
    Ok(phones) => phones,
    Err(e) => panic!("normaliser: {e}"),
});

fuzz_target!(|body: &[u8]| {
    let _ = lox24::parse(body, &PHONES, 1_700_000_000_000);
});
