//! Decodes arbitrary bytes as a pgoutput message and as a walsender frame. Whatever
//! decodes must re-encode to something that decodes to the same value.
//!
//! The first input byte picks the context: bits 0-1 the protocol version (1 to 4),
//! bit 2 `in_stream`, bit 3 `parallel_streaming`. The rest is the payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchback_pgoutput::{
    decode, decode_frame, encode, encode_frame, DecodeContext, ReplicationFrame,
};

fn check_message(payload: &[u8], ctx: DecodeContext) {
    if let Ok(msg) = decode(payload, ctx) {
        let bytes = encode(&msg, ctx);
        assert_eq!(
            decode(&bytes, ctx),
            Ok(msg),
            "message roundtrip under {ctx:?}"
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, payload)) = input.split_first() else {
        return;
    };
    let ctx = DecodeContext {
        proto_version: u32::from(selector & 0b11) + 1,
        in_stream: selector & 0b100 != 0,
        parallel_streaming: selector & 0b1000 != 0,
    };

    check_message(payload, ctx);

    if let Ok(frame) = decode_frame(payload) {
        let bytes = encode_frame(&frame);
        assert_eq!(decode_frame(&bytes), Ok(frame.clone()), "frame roundtrip");
        // The data of an XLogData frame is itself a message.
        if let ReplicationFrame::XLogData { data, .. } = &frame {
            check_message(data, ctx);
        }
    }
});
