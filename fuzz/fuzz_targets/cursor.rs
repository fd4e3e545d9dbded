//! Event ids as clients send them (`Last-Event-ID`, `last_event_id`, `after`): parsing never
//! panics, and whatever parses prints back to an id that parses to the same value.
#![no_main]

use dormouse_actors::channel::EventId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<EventId>() {
        let printed = id.to_string();
        assert_eq!(printed.parse::<EventId>().ok(), Some(id), "{text:?} -> {printed:?}");
    }
});
