//! Capture files of any format: the streaming reader never panics and always terminates.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cursor = std::io::Cursor::new(data.to_vec());
    if let Ok(mut r) = atlake::source::capture::CaptureReader::from_reader(cursor, "fuzz") {
        let mut n = 0;
        while let Some(m) = r.next_message() {
            if m.is_err() {
                break;
            }
            n += 1;
            assert!(n <= data.len() + 1);
        }
    }
});
