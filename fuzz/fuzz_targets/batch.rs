//! The batch publish parser (`POST /v1/publish`), JSON array and NDJSON: never panics, never
//! returns more entries than the limits allow, and every accepted message is within the size
//! limit and names a valid channel.
#![no_main]

use dormouse_actors::channel::validate_channel_name;
use dormouse_gateway::parse_batch;
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGES: usize = 64;
const MAX_SIZE: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let Ok(planned) = parse_batch(body, mode & 1 == 1, MAX_MESSAGES, MAX_SIZE) else {
        return;
    };
    for (channel, message) in planned.iter().flatten() {
        assert!(validate_channel_name(channel).is_ok(), "{channel:?}");
        assert!(message.data.len() <= MAX_SIZE, "{} bytes", message.data.len());
    }
});
