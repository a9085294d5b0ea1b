//! JSON text output that matches what Jetstream (Go, `goccy/go-json` with its defaults) writes,
//! and the atproto JSON data model checks used when JSON comes in.
//!
//! Strings: `"` and `\` are backslash-escaped; `\n`, `\r`, `\t` use the short forms; other control
//! characters and the HTML-sensitive `<`, `>`, `&` become `\u00XX` (lower-case hex); U+2028 and
//! U+2029 become `\u2028` / `\u2029`. Everything else is copied as UTF-8.

/// Bytes that need attention in a JSON string: control characters, `"`, `\`, `<`, `>`, `&`, and
/// 0xE2 (the lead byte of U+2028/U+2029).
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'&' as usize] = true;
    t[0xE2] = true;
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a quoted JSON string, escaped as Jetstream escapes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if !NEEDS_ESCAPE[c as usize] {
            i += 1;
            continue;
        }
        if c == 0xE2 {
            // U+2028 = E2 80 A8, U+2029 = E2 80 A9
            if i + 2 < b.len() && b[i + 1] == 0x80 && (b[i + 2] == 0xA8 || b[i + 2] == 0xA9) {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(if b[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 3;
                start = i;
            } else {
                i += 1;
            }
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 0xf) as usize]);
            }
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// Appends a signed integer in decimal.
pub fn write_i64(out: &mut Vec<u8>, v: i64) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(v).as_bytes());
}

/// Why a JSON value is not valid atproto data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataModelError {
    /// The top level must be an object.
    #[error("top-level value is not an object")]
    NotObject,
    /// A number with a fractional part, or out of the signed 64-bit range.
    #[error("number {0} is not a 64-bit integer")]
    Float(String),
    /// `$type` must be a non-empty string.
    #[error("$type must be a non-empty string")]
    BadType,
    /// A `$link` object is malformed.
    #[error("invalid $link object: {0}")]
    Link(&'static str),
    /// A `$bytes` object is malformed.
    #[error("invalid $bytes object: {0}")]
    Bytes(&'static str),
    /// A blob object is malformed.
    #[error("invalid blob: {0}")]
    Blob(&'static str),
    /// Nesting deeper than the limit.
    #[error("nesting deeper than {0}")]
    Depth(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        let mut out = Vec::new();
        write_str(&mut out, x);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_like_go() {
        assert_eq!(s("plain"), "\"plain\"");
        assert_eq!(s("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(s("<a&b>"), r#""\u003ca\u0026b\u003e""#);
        assert_eq!(
            s("l\n\r\t\u{8}\u{c}\u{1}"),
            r#""l\n\r\t\u0008\u000c\u0001""#
        );
        assert_eq!(s("x\u{2028}y\u{2029}"), r#""x\u2028y\u2029""#);
        assert_eq!(s("é☎😀"), "\"é☎😀\"");
        // other E2-led characters pass through
        assert_eq!(s("\u{2026}"), "\"\u{2026}\"");
    }
}
