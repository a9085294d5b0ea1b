//! Identifier syntax from the atproto specs: NSID, DID, handle, record key, TID, AT-URI,
//! at-identifier, CID string, datetime, language tag and generic URI.
//!
//! These checks guard every name that may become part of a lake path or a partition value: a
//! collection is only used in a path after [`is_nsid`] accepted it. All functions are pure and
//! allocation-free.

/// Longest NSID.
pub const NSID_MAX: usize = 317;
/// Longest DID (atproto hard limit).
pub const DID_MAX: usize = 2048;
/// Longest handle.
pub const HANDLE_MAX: usize = 253;
/// Longest record key.
pub const RKEY_MAX: usize = 512;
/// Longest AT-URI.
pub const AT_URI_MAX: usize = 8192;

fn is_alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

/// A domain label: 1–63 of `[A-Za-z0-9-]`, no leading or trailing hyphen.
fn is_label(l: &[u8]) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && is_alnum(l[0])
        && is_alnum(l[l.len() - 1])
        && l.iter().all(|&c| is_alnum(c) || c == b'-')
}

/// Namespaced identifier, e.g. `app.bsky.feed.post`.
pub fn is_nsid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > NSID_MAX || !b.is_ascii() {
        return false;
    }
    let segs: Vec<&[u8]> = b.split(|&c| c == b'.').collect();
    if segs.len() < 3 {
        return false;
    }
    let (name, authority) = match segs.split_last() {
        Some(x) => x,
        None => return false,
    };
    if !authority.iter().all(|l| is_label(l)) {
        return false;
    }
    if authority[0][0].is_ascii_digit() {
        return false;
    }
    // name: letter first, then letters and digits, 1..=63
    !name.is_empty()
        && name.len() <= 63
        && name[0].is_ascii_alphabetic()
        && name.iter().all(|&c| is_alnum(c))
}

/// NSID filter pattern: a full NSID, or a prefix ending in `.*` at a segment boundary, or `*`.
pub fn is_nsid_pattern(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    match s.strip_suffix(".*") {
        Some(prefix) => {
            !prefix.is_empty()
                && prefix.len() < NSID_MAX
                && prefix.split('.').all(|l| is_label(l.as_bytes()))
        }
        None => is_nsid(s),
    }
}

/// Whether `nsid` matches a pattern accepted by [`is_nsid_pattern`].
pub fn nsid_matches(pattern: &str, nsid: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => nsid.starts_with(prefix),
        None => pattern == nsid,
    }
}

/// DID: `did:<method>:<identifier>`.
pub fn is_did(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > DID_MAX || !b.starts_with(b"did:") {
        return false;
    }
    let rest = &b[4..];
    let colon = match rest.iter().position(|&c| c == b':') {
        Some(i) => i,
        None => return false,
    };
    let method = &rest[..colon];
    let id = &rest[colon + 1..];
    if method.is_empty() || !method.iter().all(|c| c.is_ascii_lowercase()) {
        return false;
    }
    if id.is_empty() {
        return false;
    }
    let last = id[id.len() - 1];
    if last == b':' || last == b'%' {
        return false;
    }
    id.iter()
        .all(|&c| is_alnum(c) || matches!(c, b'.' | b'_' | b':' | b'%' | b'-'))
}

/// Handle: a DNS name with at least two labels whose last label does not start with a digit.
pub fn is_handle(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > HANDLE_MAX || !b.is_ascii() {
        return false;
    }
    let labels: Vec<&[u8]> = b.split(|&c| c == b'.').collect();
    if labels.len() < 2 || !labels.iter().all(|l| is_label(l)) {
        return false;
    }
    labels[labels.len() - 1][0].is_ascii_alphabetic()
}

/// Record key: 1–512 of `[A-Za-z0-9._:~-]`, not `.` or `..`.
pub fn is_rkey(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= RKEY_MAX
        && s != "."
        && s != ".."
        && b.iter()
            .all(|&c| is_alnum(c) || matches!(c, b'.' | b'_' | b':' | b'~' | b'-'))
}

const TID_CHARS: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";

/// TID: 13 characters of base32-sortable, first character in `234567abcdefghij`.
pub fn is_tid(s: &str) -> bool {
    tid_value(s).is_some()
}

/// The value of each byte as a TID character (its index in [`TID_CHARS`]), or 32 if it is not
/// one: a table, as every backfilled record's key is checked and decoded.
const TID_VALUES: [u8; 256] = {
    let mut t = [32u8; 256];
    let mut i = 0;
    while i < TID_CHARS.len() {
        t[TID_CHARS[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The value a TID spells (13 base-32 digits, 65 bits whose top one is zero), if `s` is a
/// TID. Values sort as the TIDs' text does.
pub fn tid_value(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 13 {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &c) in b.iter().enumerate() {
        let d = TID_VALUES[c as usize];
        // the first character carries the top (zero) bit: only the first 16 are allowed
        if d >= 32 || (i == 0 && d >= 16) {
            return None;
        }
        v = (v << 5) | u64::from(d);
    }
    Some(v)
}

/// A `did:plc:` DID as the 120 bits its 24 base32 characters spell, big-endian: 15 bytes
/// instead of 32, in the order of the text (the digits' values follow their ASCII order).
/// `None` for any other DID.
pub fn plc_bits(did: &str) -> Option<[u8; 15]> {
    let b = plc_value(did.as_bytes())?.to_be_bytes();
    let mut out = [0u8; 15];
    out.copy_from_slice(&b[1..]);
    Some(out)
}

/// The value [`plc_bits`] spells, as a number below 2^120, of any bytes (`None` unless they
/// are a `did:plc:` DID). It counts the distinct DIDs of a query (`count(DISTINCT did)`, one
/// call per row), so it has no branch per character: every character is looked up and the
/// check comes once at the end, over two independent halves of twelve.
pub fn plc_value(did: &[u8]) -> Option<u128> {
    let id: &[u8; 24] = did.strip_prefix(b"did:plc:")?.try_into().ok()?;
    let (mut hi, mut lo, mut bad) = (0u64, 0u64, 0u8);
    for i in 0..12 {
        let (h, l) = (TID_VALUES[id[i] as usize], TID_VALUES[id[i + 12] as usize]);
        // a value is below 32, the mark of a non-character is 32
        bad |= h | l;
        hi = (hi << 5) | u64::from(h);
        lo = (lo << 5) | u64::from(l);
    }
    (bad & 32 == 0).then(|| (u128::from(hi) << 60) | u128::from(lo))
}

/// The DID [`plc_bits`] packed.
pub fn plc_did(bits: &[u8; 15]) -> String {
    let mut b = [0u8; 16];
    b[1..].copy_from_slice(bits);
    let mut out = String::with_capacity(32);
    out.push_str("did:plc:");
    push_base32(&mut out, u128::from_be_bytes(b), 24);
    out
}

/// The last `digits` base-32 digits of `v`, in [`TID_CHARS`] (sortable) order.
fn push_base32(out: &mut String, v: u128, digits: u32) {
    for i in (0..digits).rev() {
        out.push(TID_CHARS[((v >> (5 * i)) & 31) as usize] as char);
    }
}

/// The µs timestamp inside a TID (top 53 bits after the zero bit).
pub fn tid_timestamp_us(s: &str) -> Option<i64> {
    let v = tid_value(s)?;
    // 13 * 5 = 65 bits; the first character carries the zero bit at the top
    Some(((v >> 10) & ((1u64 << 53) - 1)) as i64)
}

/// The TID whose value ([`tid_value`]) is `v`.
pub fn tid_text(v: u64) -> String {
    let mut out = String::with_capacity(13);
    push_base32(&mut out, u128::from(v), 13);
    out
}

/// Encodes a µs timestamp and clock id as a TID.
pub fn tid_from_parts(time_us: u64, clock_id: u16) -> String {
    tid_text(((time_us & ((1u64 << 53) - 1)) << 10) | u64::from(clock_id & 0x3ff))
}

/// A DID or a handle.
pub fn is_at_identifier(s: &str) -> bool {
    if s.starts_with("did:") {
        is_did(s)
    } else {
        is_handle(s)
    }
}

/// AT-URI in the restricted form Lexicon uses: `at://<authority>[/<nsid>[/<rkey>]]`.
pub fn is_at_uri(s: &str) -> bool {
    if s.len() > AT_URI_MAX {
        return false;
    }
    let rest = match s.strip_prefix("at://") {
        Some(r) => r,
        None => return false,
    };
    let (path, fragment) = match rest.split_once('#') {
        Some((p, f)) => (p, Some(f)),
        None => (rest, None),
    };
    if let Some(f) = fragment {
        let fb = f.as_bytes();
        if fb.len() < 2
            || fb[0] != b'/'
            || !fb[1..]
                .iter()
                .all(|&c| c.is_ascii_graphic() && c != b'#' && c != b'"' && c != b'\\')
        {
            return false;
        }
    }
    let mut parts = path.split('/');
    let authority = parts.next().unwrap_or("");
    if !is_at_identifier(authority) {
        return false;
    }
    match parts.next() {
        None => true,
        Some(coll) => {
            if !is_nsid(coll) {
                return false;
            }
            match parts.next() {
                None => true,
                Some(rkey) => is_rkey(rkey) && parts.next().is_none(),
            }
        }
    }
}

/// Parses an AT-URI into (authority, collection, rkey).
pub fn split_at_uri(s: &str) -> Option<(&str, Option<&str>, Option<&str>)> {
    if !is_at_uri(s) {
        return None;
    }
    let rest = s.strip_prefix("at://")?;
    let path = rest.split('#').next()?;
    let mut parts = path.splitn(3, '/');
    Some((parts.next()?, parts.next(), parts.next()))
}

/// CID string syntax (any multibase CIDv1; `Qm…` CIDv0 is refused).
pub fn is_cid_string(s: &str) -> bool {
    (8..=256).contains(&s.len())
        && !s.starts_with("Qmb")
        && s.bytes().all(|c| is_alnum(c) || c == b'+' || c == b'=')
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |a, &c| a * 10 + u32::from(c - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
/// Day number since 1970-01-01 of (year, month, day).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

/// Why a datetime string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatetimeError {
    /// Not `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
    #[error("not an RFC 3339 datetime")]
    Syntax,
    /// Syntactically fine but not a real instant (month 13, second 61, before year 0).
    #[error("datetime out of range")]
    Range,
}

/// Checks atproto datetime syntax (RFC 3339 ∩ ISO 8601, time zone required, `-00:00` refused).
pub fn is_datetime(s: &str) -> bool {
    split_datetime(s).is_ok()
}

struct DateParts {
    y: i64,
    mo: u32,
    d: u32,
    h: u32,
    mi: u32,
    sec: u32,
    micros: u32,
    offset_min: i64,
}

fn split_datetime(s: &str) -> Result<DateParts, DatetimeError> {
    let b = s.as_bytes();
    let e = DatetimeError::Syntax;
    if b.len() < 20 || b.len() > 64 {
        return Err(e);
    }
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return Err(e);
    }
    let y = digits(&b[0..4]).ok_or(e)?;
    let mo = digits(&b[5..7]).ok_or(e)?;
    let d = digits(&b[8..10]).ok_or(e)?;
    let h = digits(&b[11..13]).ok_or(e)?;
    let mi = digits(&b[14..16]).ok_or(e)?;
    let sec = digits(&b[17..19]).ok_or(e)?;
    let mut i = 19;
    let mut micros = 0u32;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 6 {
                micros = micros * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return Err(e);
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let tz = &b[i..];
    let offset_min = match tz {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = digits(&[*h1, *h2]).ok_or(e)?;
            let om = digits(&[*m1, *m2]).ok_or(e)?;
            if *sign == b'-' && oh == 0 && om == 0 {
                return Err(e);
            }
            let v = i64::from(oh * 60 + om);
            if *sign == b'-' { -v } else { v }
        }
        _ => return Err(e),
    };
    Ok(DateParts {
        y: i64::from(y),
        mo,
        d,
        h,
        mi,
        sec,
        micros,
        offset_min,
    })
}

/// Parses an atproto datetime to µs since the Unix epoch (UTC).
pub fn parse_datetime_us(s: &str) -> Result<i64, DatetimeError> {
    let p = split_datetime(s)?;
    if !(1..=12).contains(&p.mo)
        || p.d == 0
        || p.d > days_in_month(p.y, p.mo)
        || p.h > 23
        || p.mi > 59
        || p.sec > 60
    {
        return Err(DatetimeError::Range);
    }
    let sec = p.sec.min(59);
    let days = days_from_civil(p.y, p.mo, p.d);
    let secs = days * 86_400 + i64::from(p.h * 3600 + p.mi * 60 + sec) - p.offset_min * 60;
    // year 0 at UTC or later
    if secs < days_from_civil(0, 1, 1) * 86_400 {
        return Err(DatetimeError::Range);
    }
    Ok(secs * 1_000_000 + i64::from(p.micros))
}

/// Formats µs since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (millisecond precision, as relays do).
pub fn format_datetime_ms(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let ms = us.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// BCP-47 language tag, naive form: a 2–3 letter lower-case primary subtag (or the `i`/`x`
/// singletons), then `-` subtags.
pub fn is_language(s: &str) -> bool {
    let mut parts = s.split('-');
    let primary = parts.next().unwrap_or("");
    let ok_primary = matches!(primary, "i" | "x" | "X")
        || ((2..=3).contains(&primary.len()) && primary.bytes().all(|c| c.is_ascii_lowercase()));
    ok_primary && parts.all(|p| !p.is_empty() && p.len() <= 8 && p.bytes().all(is_alnum))
}

/// Generic URI: `scheme:rest` with no whitespace, at most 8 KiB.
pub fn is_uri(s: &str) -> bool {
    if s.len() > AT_URI_MAX {
        return false;
    }
    let (scheme, rest) = match s.split_once(':') {
        Some(x) => x,
        None => return false,
    };
    let sb = scheme.as_bytes();
    !sb.is_empty()
        && sb.len() <= 80
        && sb[0].is_ascii_alphabetic()
        && sb.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+')
        })
        && !rest.is_empty()
        && rest.bytes().all(|c| c.is_ascii_graphic())
}

// ---- endpoint URLs ----

/// The full `subscribeRepos` URL for a bare host or full URL.
pub fn firehose_url(url: &str) -> String {
    const PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";
    let u = with_scheme(url);
    let base = u.split('?').next().unwrap_or(&u).trim_end_matches('/');
    if base.ends_with(PATH) {
        base.to_string()
    } else {
        format!("{base}{PATH}")
    }
}

/// The full Jetstream `/subscribe` URL for a bare host or full URL.
pub fn jetstream_url(url: &str) -> String {
    let u = with_scheme(url);
    let base = u.split('?').next().unwrap_or(&u).trim_end_matches('/');
    if base.ends_with("/subscribe") {
        base.to_string()
    } else {
        format!("{base}/subscribe")
    }
}

/// Checks that a source URL (bare host or full URL) is a usable WebSocket URL.
pub fn validate_url(url: &str) -> Result<(), String> {
    if let Some((scheme, _)) = url.trim().split_once("://")
        && !matches!(scheme, "ws" | "wss" | "http" | "https")
    {
        return Err(format!(
            "{url:?}: unsupported scheme {scheme:?} (use wss://, ws://, https:// or a bare host)"
        ));
    }
    let u = with_scheme(url);
    let rest = u
        .strip_prefix("wss://")
        .or_else(|| u.strip_prefix("ws://"))
        .ok_or_else(|| format!("{url:?} is not a ws://, wss://, http(s):// URL or a host name"))?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let name = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let ok_host = !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'[' | b']' | b':'));
    if !ok_host
        || u.bytes()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(format!(
            "{url:?} is not a valid source URL (expected e.g. wss://bsky.network or wss://jetstream2.us-east.bsky.network/subscribe)"
        ));
    }
    Ok(())
}

fn with_scheme(url: &str) -> String {
    let u = url.trim();
    if u.starts_with("ws://") || u.starts_with("wss://") {
        u.to_string()
    } else if let Some(rest) = u.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = u.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        format!("wss://{u}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_round_trip() {
        let t = tid_from_parts(1_700_000_000_000_000, 7);
        assert!(is_tid(&t));
        assert_eq!(tid_timestamp_us(&t), Some(1_700_000_000_000_000));
    }

    /// A `did:plc:` DID packs into 15 bytes and back, in the order of its text; anything
    /// else is not packed.
    #[test]
    fn plc_dids_pack_into_fifteen_bytes_in_text_order() {
        let dids = [
            "did:plc:z72i7hdynmk6r22z27h6tvur",
            "did:plc:222222222222222222222222",
            "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz",
            "did:plc:aaaaaaaaaaaaaaaaaaaaaaa7",
            "did:plc:aaaaaaaaaaaaaaaaaaaaaaba",
            "did:plc:7aaaaaaaaaaaaaaaaaaaaaaa",
            "did:plc:2zzzzzzzzzzzzzzzzzzzzzzz",
        ];
        let mut packed = Vec::new();
        for d in dids {
            let b = plc_bits(d).unwrap();
            assert_eq!(plc_did(&b), d);
            packed.push((b, d));
        }
        // every character's value: each of the 32 in each of the 24 places
        for (i, c) in TID_CHARS.iter().enumerate() {
            for place in 0..24 {
                let mut id = [b'2'; 24];
                id[place] = *c;
                let d = format!("did:plc:{}", std::str::from_utf8(&id).unwrap());
                let b = plc_bits(&d).unwrap();
                assert_eq!(plc_did(&b), d);
                let bit = 5 * (23 - place);
                let v = u128::from_be_bytes({
                    let mut x = [0u8; 16];
                    x[1..].copy_from_slice(&b);
                    x
                });
                assert_eq!(v, (i as u128) << bit, "{d}");
            }
        }
        packed.sort();
        let mut text = dids.to_vec();
        text.sort();
        assert_eq!(packed.iter().map(|p| p.1).collect::<Vec<_>>(), text);
        for other in [
            "did:web:example.com",
            "did:plc:z72i7hdynmk6r22z27h6tvu",
            "did:plc:z72i7hdynmk6r22z27h6tvurr",
            "did:plc:Z72i7hdynmk6r22z27h6tvur",
            "did:plc:z72i7hdynmk6r22z27h6tv0r",
            "did:plc:z72i7hdynmk6r22z27h6tv8r",
            "did:plx:z72i7hdynmk6r22z27h6tvur",
            "did:plc:z72i7hdynmk6r22z27h6tvé",
        ] {
            assert_eq!(plc_bits(other), None, "{other}");
        }
    }

    #[test]
    fn tids_are_checked_character_by_character() {
        // the largest: the first character carries the zero bit, so it is one of the first 16
        assert!(is_tid("jzzzzzzzzzzzz"));
        assert_eq!(tid_timestamp_us("jzzzzzzzzzzzz"), Some((1i64 << 53) - 1));
        assert_eq!(tid_timestamp_us("2222222222222"), Some(0));
        for bad in [
            "kzzzzzzzzzzzz",  // first character past the 16th
            "3jzr2ixb6a21",   // 12 characters
            "3jzr2ixb6a2212", // 14
            "3jzr2ixb6a21A",  // upper case
            "3jzr2ixb6a211",  // '1' is not in the alphabet
            "3jzr2ixb6a210",
            "3jzr2ixb6a21-",
            "3jzr2ixb6a2é", // 13 bytes, not 13 characters of the alphabet
        ] {
            assert!(!is_tid(bad), "{bad}");
            assert_eq!(tid_timestamp_us(bad), None, "{bad}");
        }
        for (i, c) in TID_CHARS.iter().enumerate() {
            let t = format!("2222222222{}22", *c as char);
            assert_eq!(tid_value(&t), Some((i as u64) << 10), "{t}");
        }
    }

    #[test]
    fn datetime_round_trip() {
        let us = parse_datetime_us("2026-07-04T14:38:07.517Z").unwrap();
        assert_eq!(format_datetime_ms(us), "2026-07-04T14:38:07.517Z");
        assert_eq!(parse_datetime_us("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_datetime_us("1970-01-01T01:00:00+01:00"),
            Ok(0),
            "offsets are applied"
        );
    }

    #[test]
    fn patterns() {
        assert!(is_nsid_pattern("app.bsky.*"));
        assert!(is_nsid_pattern("app.bsky.feed.post"));
        assert!(!is_nsid_pattern("app.bsky.fe*"));
        assert!(nsid_matches("app.bsky.*", "app.bsky.feed.like"));
        assert!(!nsid_matches("app.bsky.*", "app.bskyx.feed"));
    }

    #[test]
    fn urls() {
        assert_eq!(
            firehose_url("wss://bsky.network"),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            firehose_url("bsky.network"),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            firehose_url("ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos?cursor=5"),
            "ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            jetstream_url("wss://jetstream2.us-east.bsky.network"),
            "wss://jetstream2.us-east.bsky.network/subscribe"
        );
        assert_eq!(
            jetstream_url("wss://j.example/subscribe?x=1"),
            "wss://j.example/subscribe"
        );
    }

    #[test]
    fn url_validation() {
        assert!(validate_url("wss://bsky.network").is_ok());
        assert!(validate_url("bsky.network").is_ok());
        assert!(validate_url("ws://127.0.0.1:6008").is_ok());
        assert!(validate_url("ht!tp://bad url").is_err());
        assert!(validate_url("wss://").is_err());
        assert!(validate_url("ftp://x").is_err());
    }
}
