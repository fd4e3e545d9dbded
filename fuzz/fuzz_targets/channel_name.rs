//! Channel-name validation: never panics, and accepts exactly the documented rule (1 to 200
//! characters from A-Z a-z 0-9 _ - . : @ =).
#![no_main]

use dormouse_actors::channel::validate_channel_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let rule = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:@=".contains(c));
    let verdict = validate_channel_name(name);
    assert_eq!(verdict.is_ok(), rule, "{name:?}: {verdict:?}");
    if let Err(message) = verdict {
        assert!(message.contains("channel names are"), "{message}");
    }
});
