//! `keysource::proxy_header` on arbitrary bytes, and on every prefix of them.
//!
//! Invariants: it never panics; a `Complete` header's `len` is at least 1 and at most the
//! input's length; every proper prefix of a valid header is `Incomplete` (never
//! `Invalid`: the dispatcher would close a valid connection whose header came in two
//! segments); once `Complete(h)`, more bytes never change `h`; and once `Invalid`, more
//! bytes never make it `Complete`. (`Invalid` may turn `Incomplete` again on garbage:
//! ppp guesses that `PROX …PROX` is unfinished. Harmless: the dispatcher acts on the first
//! `Invalid`, and otherwise closes garbage after `key_timeout`.)

#![no_main]

use libfuzzer_sys::fuzz_target;
use sticky_dispatch::keysource::{proxy_header, Parsed};

/// Prefixes checked per input: every one for short inputs, evenly spread for long ones.
const CUTS: usize = 512;

fuzz_target!(|data: &[u8]| {
    let whole = proxy_header(data);
    if let Parsed::Complete(header) = &whole {
        assert!(header.len >= 1 && header.len <= data.len(), "{header:?}");
    }
    let step = (data.len() / CUTS).max(1);
    let mut last = Parsed::Incomplete;
    for cut in (0..=data.len()).step_by(step).chain([data.len()]) {
        let now = proxy_header(&data[..cut]);
        match (&last, &now) {
            (Parsed::Incomplete, _) => {}
            (Parsed::Complete(a), Parsed::Complete(b)) if a == b => {}
            (Parsed::Invalid, Parsed::Invalid | Parsed::Incomplete) => {}
            _ => panic!("{last:?} at a shorter prefix, then {now:?} at {cut} bytes"),
        }
        if let Parsed::Complete(header) = &now {
            assert!(header.len <= cut, "{header:?} from {cut} bytes");
            if cut == header.len {
                // Exactly the header: every shorter prefix must have been Incomplete.
                assert!(
                    (1..cut).all(|c| proxy_header(&data[..c]) == Parsed::Incomplete),
                    "a prefix of the valid header {:?} is not Incomplete",
                    &data[..cut]
                );
            }
        }
        // Invalid stays the last verdict until a Complete would contradict it.
        if !(last == Parsed::Invalid && now == Parsed::Incomplete) {
            last = now;
        }
    }
    if last != Parsed::Invalid {
        assert_eq!(last, whole);
    }
});
