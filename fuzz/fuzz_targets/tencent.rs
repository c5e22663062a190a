//! Tencent Cloud Chat callbacks, with and without the URL's CallbackCommand.
#![no_main]

use libfuzzer_sys::fuzz_target;
use suppressd::providers::tencent;

fuzz_target!(|body: &[u8]| {
    let _ = tencent::parse(body, None, 1_700_000_000_000);
    let _ = tencent::parse(
        body,
        Some("OfficialAccount.CallbackAfterDeleteSubscriber"),
        1_700_000_000_000,
    );
});
