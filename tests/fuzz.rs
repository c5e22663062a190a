//! The bounded fuzz run: every `fuzz/` target for a few seconds from its seed corpus, so a parser
//! change that panics, hangs or allocates without bound on hostile input fails the suite. Longer
//! runs and AddressSanitizer are for `fuzz/run-bounded.sh` by hand (see fuzz/README.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

#[test]
fn every_fuzz_target_survives_a_bounded_run() {
    common::require_tools("fuzz", &["cargo-fuzz"]);
    let seconds = std::env::var("FUZZ_SECONDS").unwrap_or_else(|_| "5".to_owned());
    let output = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/run-bounded.sh"))
        .env("FUZZ_SECONDS", &seconds)
        .env("FUZZ_SANITIZER", "none")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "fuzz run failed:\n{stdout}\n{stderr}"
    );
    for target in ["lox24", "tencent", "sendios", "phone"] {
        let section = stdout
            .split("== fuzzing ")
            .find(|section| section.starts_with(target))
            .unwrap_or_else(|| panic!("{target} was not run:\n{stdout}"));
        let executed: u64 = section
            .lines()
            .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("{target}: no run count:\n{section}"));
        assert!(executed > 1_000, "{target} ran only {executed} inputs");
    }
}
