//! The storage key codec: decoding arbitrary bytes never panics, and a decoded key encodes
//! back to exactly the same bytes (so one record has one key).
#![no_main]

use dormouse_storage::key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = key::decode(data) {
        let encoded = decoded.encode().expect("a decoded key encodes");
        assert_eq!(encoded, data, "{decoded:?}");
    }
});
