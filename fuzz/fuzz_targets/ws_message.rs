//! What a WebSocket client may send: parsing never panics, and a publish it accepts carries
//! exactly the data it was given (decoded from base64 when sent as `data_base64`).
#![no_main]

use dormouse_gateway::{ClientMessage, parse_client_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ClientMessage::Publish { data, .. }) = parse_client_message(text) {
        let raw: serde_json::Value = serde_json::from_str(text).expect("accepted means JSON");
        if let Some(plain) = raw["data"].as_str() {
            assert_eq!(&data[..], plain.as_bytes());
        }
    }
});
