//! Frame envelopes: a message header plus body, error frames and `#info` frames.

use crate::decode::cbor::Encoder;

/// Builds a frame from a message type and an encoded body.
pub fn frame_bytes(t: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Encoder::new();
    h.map(2).text("t").text(t).text("op").int(1);
    h.buf.extend_from_slice(body);
    h.buf
}

/// Builds an error frame.
pub fn error_frame(error: &str, message: &str) -> Vec<u8> {
    let mut h = Encoder::new();
    h.map(1).text("op").int(-1);
    h.map(2)
        .text("error")
        .text(error)
        .text("message")
        .text(message);
    h.buf
}

/// Builds an `#info` frame.
pub fn info_frame(name: &str, message: &str) -> Vec<u8> {
    let mut b = Encoder::new();
    b.map(2)
        .text("name")
        .text(name)
        .text("message")
        .text(message);
    frame_bytes("#info", &b.buf)
}
