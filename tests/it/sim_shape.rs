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
    let mut heads: std::collections::HashMap<String, (String, String)> = Default::default();
    let mut chained = 0;
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
            // Sync 1.1: `since` and `prevData` name the repo's previous commit and the MST
            // root (`data`) of its signed commit block, both absent on its first commit
            let signed = atlake::decode::repo::Commit::decode(car.get(&c.commit).unwrap()).unwrap();
            let prev_data = c.prev_data.value().map(|p| p.to_string());
            let since = c.since.value().map(|s| s.to_string());
            let (root, rev) = (signed.data.to_string(), signed.rev.unwrap());
            match heads.insert(c.repo.to_string(), (rev, root)) {
                Some((rev, root)) => {
                    assert_eq!(prev_data, Some(root), "prevData");
                    assert_eq!(since, Some(rev), "since");
                }
                None => assert!(prev_data.is_none() && since.is_none()),
            }
            chained += usize::from(since.is_some());
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
    // most commits continue a chain (5,000 accounts, 8,000 messages)
    assert!(
        chained > commits / 3,
        "{chained} of {commits} commits chained"
    );
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
