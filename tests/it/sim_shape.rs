//! The simulator's traffic has the shape the issue asks for.

use atlake::decode::car::Car;
use atlake::decode::frame::{Body, parse_frame};
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use std::collections::BTreeMap;

#[test]
fn traffic_mix_and_frame_shape_are_realistic() {
    let mut t = Traffic::new(TrafficConfig {
        seed: 3,
        ..Default::default()
    });
    let mut by_coll: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_op: BTreeMap<&str, u64> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut commit_bytes, mut commits, mut multi) = (0usize, 0usize, 0usize);
    let (mut min_blocks, mut max_blocks) = (usize::MAX, 0);
    let n = 8_000;
    for _ in 0..n {
        let m = t.next_message();
        let (_, body) = parse_frame(&m.frame).unwrap();
        if let Body::Commit(c) = &body {
            commits += 1;
            commit_bytes += m.frame.len();
            let car = Car::parse(c.blocks, true).unwrap();
            if c.ops.len() > 1 {
                multi += 1;
            } else {
                min_blocks = min_blocks.min(car.blocks.len());
                max_blocks = max_blocks.max(car.blocks.len());
            }
            assert!(c.prev_data.value().is_some(), "Sync 1.1: prevData");
            assert_eq!(c.prev, atlake::decode::frame::Field::Absent);
        }
        for k in m.truth() {
            *kinds.entry(k.kind).or_default() += 1;
            if k.kind == "commit" {
                let c = if k.collection.starts_with("app.bsky.") {
                    k.collection.clone()
                } else {
                    "third-party".into()
                };
                *by_coll.entry(c).or_default() += 1;
                *by_op.entry(k.operation).or_default() += 1;
            }
        }
    }
    let total: u64 = by_coll.values().sum();
    let pct = |c: &str| 100.0 * *by_coll.get(c).unwrap_or(&0) as f64 / total as f64;
    let mean = commit_bytes / commits;
    eprintln!(
        "mix: {by_coll:?} ops: {by_op:?} kinds: {kinds:?} mean commit frame {mean} B, blocks {min_blocks}..{max_blocks}, multi-op {multi}"
    );
    assert!(
        (40.0..50.0).contains(&pct("app.bsky.feed.like")),
        "likes {}",
        pct("app.bsky.feed.like")
    );
    assert!((20.0..30.0).contains(&pct("app.bsky.graph.follow")));
    assert!((7.0..13.0).contains(&pct("app.bsky.feed.post")));
    assert!((5.0..9.0).contains(&pct("app.bsky.feed.repost")));
    assert!(pct("third-party") > 2.0);
    let deletes = 100.0 * by_op["delete"] as f64 / total as f64;
    assert!((2.0..6.0).contains(&deletes), "deletes {deletes}");
    assert!(by_op["update"] > 0);
    assert!(kinds["identity"] > 0 && kinds["account"] > 0);
    assert!(multi > 0);
    assert!((4000..7000).contains(&mean), "mean commit frame {mean}");
    assert!(
        min_blocks >= 4 && max_blocks <= 17,
        "single-op commits: {min_blocks}..{max_blocks} blocks"
    );
}
