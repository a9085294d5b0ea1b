//! Repository CARs (`getRepo`): the chunked stream reader and the MST walk never panic. Hashes
//! are not verified on the walk's side so mutated trees reach the MST checks.
#![no_main]
use atlake::decode::{car, mst, repo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut s = car::CarStream::new(1 << 16);
    for part in data.chunks(61) {
        s.push(part);
        while let Ok(Some(_)) = s.next_block() {}
    }
    let _ = s.finish();
    let _ = mst::Node::decode(data);
    if let Ok(c) = car::Car::parse(data, false) {
        let root = c.roots[0];
        let _ = repo::walk_records(&c, &root, "did:plc:fuzz", &mut |r| {
            assert!(!r.collection.is_empty() && !r.rkey.is_empty());
            Ok(())
        });
    }
});
