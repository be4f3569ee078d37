//! Pure decoder (bytes in, typed messages out) and encoder of PostgreSQL's pgoutput
//! logical replication protocol, versions 1 to 4, and of the walsender frames that
//! carry them. No I/O. The decoder never panics on any input: malformed bytes give a
//! [`DecodeError`]. The encoder exists for property tests and for tests that replay
//! hand-made streams.

mod decode;
mod encode;
mod message;

pub use decode::{decode, decode_frame, DecodeError, Decoder};
pub use encode::{encode, encode_frame};
pub use message::*;
