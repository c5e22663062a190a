//! The phone normaliser, with and without a default region; a number it accepts must be E.164
//! and normalise to itself.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use suppressd::phone::Normalizer;

static PLAIN: LazyLock<Normalizer> = LazyLock::new(|| normaliser(None));
static GERMAN: LazyLock<Normalizer> = LazyLock::new(|| normaliser(Some("DE")));

fn normaliser(region: Option<&str>) -> Normalizer {
    match Normalizer::new(region) {
        Ok(phones) => phones,
        Err(e) => panic!("normaliser: {e}"),
    }
}

fuzz_target!(|input: &str| {
    for phones in [&*PLAIN, &*GERMAN] {
        if let Ok(e164) = phones.normalize(input) {
            assert!(e164.starts_with('+') && e164[1..].bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(phones.normalize(&e164).as_deref(), Ok(e164.as_str()));
        }
    }
});
