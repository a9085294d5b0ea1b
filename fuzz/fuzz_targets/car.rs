//! CARv1 slices: never panics, with and without hash verification.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = atlake::decode::car::Car::parse(data, true);
    if let Ok(car) = atlake::decode::car::Car::parse(data, false) {
        for (cid, _) in &car.blocks {
            assert!(car.get(cid).is_some());
        }
    }
    let _ = atlake::decode::cid::Cid::from_bytes(data);
});
