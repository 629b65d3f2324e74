//! `keysource::http_key` on arbitrary bytes with each kind of key source, and on every
//! prefix of them.
//!
//! Invariants: it never panics; and as bytes arrive (each prefix in turn) the answers run
//! `Incomplete`… then either `Complete(key)` with the same key from then on (bytes after
//! a complete request head never change the key), or `Invalid` from then on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sticky_dispatch::keysource::{http_key, HttpKeySource, Parsed};

/// Prefixes checked per input: every one for short inputs, evenly spread for long ones.
const CUTS: usize = 256;

fuzz_target!(|input: &[u8]| {
    // First byte: which source; for cookie and query, the name runs up to the first NUL.
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let (source, data) = match selector % 3 {
        0 => (
            HttpKeySource::ForwardedFor {
                trusted_hops: selector / 3 % 5,
            },
            rest,
        ),
        kind => {
            let split = rest.iter().position(|&b| b == 0).unwrap_or(0);
            let name = String::from_utf8_lossy(&rest[..split]).into_owned();
            let data = rest.get(split + 1..).unwrap_or_default();
            if kind == 1 {
                (HttpKeySource::Cookie(name), data)
            } else {
                (HttpKeySource::Query(name), data)
            }
        }
    };
    let whole = http_key(data, &source);
    let step = (data.len() / CUTS).max(1);
    let mut last = Parsed::Incomplete;
    for cut in (0..=data.len()).step_by(step).chain([data.len()]) {
        let now = http_key(&data[..cut], &source);
        match (&last, &now) {
            (Parsed::Incomplete, _) => {}
            (Parsed::Complete(a), Parsed::Complete(b)) if a == b => {}
            (Parsed::Invalid, Parsed::Invalid) => {}
            _ => panic!("{last:?} at a shorter prefix, then {now:?} at {cut} bytes ({source:?})"),
        }
        last = now;
    }
    assert_eq!(last, whole);
});
