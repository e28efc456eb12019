//! Coverage-guided fuzzing of the PROXY header parser: any bytes, fed whole and split at a
//! fuzzer-chosen point, must never panic, never ask to buffer past the cap, and parse the same
//! either way.
#![no_main]

use echo_service::proxy_protocol::{parse, parser::V1_MAX_LEN, Parsed};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = parse(bytes, CAP);
    if let Ok(Parsed::Incomplete { upto }) = &whole {
        assert!(*upto <= CAP.max(V1_MAX_LEN));
    }
    if let Ok(Parsed::Complete { len, .. }) = &whole {
        assert!(*len <= bytes.len());
        // A header is decided by its own bytes: what follows it changes nothing.
        assert_eq!(parse(&bytes[..*len], CAP), whole);
    }
    // The answer for a prefix never contradicts the answer for the whole.
    let cut = usize::from(split) % (bytes.len() + 1);
    match parse(&bytes[..cut], CAP) {
        Ok(Parsed::Incomplete { .. }) => {}
        prefix => assert_eq!(prefix, whole, "prefix of {cut} bytes"),
    }
});
