#![allow(missing_docs)]
//! The purge's deletion facts: loading 2M record deletes (of 200,000 DIDs, like rkeys), and
//! looking up rows, one record and one account each, of which 1 in 10 is a deleted record;
//! held in memory (a 1 GiB budget) against spilled to disk (the default 64 MiB budget).
//!
//! Run: `cargo bench --bench facts` (add `-- --quick` for a shorter run). The load time and
//! the memory held are printed once per budget.

use atlake::checkpoint::facts::{Budget, Facts};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const FACTS: u64 = 2_000_000;
const DIDS: u64 = 200_000;
const ROWS: u64 = 100_000;

fn did(i: u64) -> String {
    format!("did:plc:{:024}", i * 7919 % DIDS)
}

fn rkey(i: u64) -> String {
    format!("3l{i:011}")
}

fn load(memory: usize) -> Facts {
    let started = std::time::Instant::now();
    let mut f = Facts::new(Budget {
        memory,
        spill_dir: std::env::temp_dir(),
    });
    for i in 0..FACTS {
        f.add_record(&did(i), "app.bsky.feed.like", &rkey(i), i as i64)
            .expect("add");
    }
    f.seal().expect("seal");
    eprintln!(
        "facts: {FACTS} loaded with a budget of {} MiB in {:.2?}: spilled {}, {:.1} MiB held",
        memory >> 20,
        started.elapsed(),
        f.spilled(),
        f.memory_bytes() as f64 / (1 << 20) as f64
    );
    f
}

fn bench(c: &mut Criterion) {
    // rows to decide on: every tenth a deleted record, the rest live ones
    let rows: Vec<(String, String)> = (0..ROWS)
        .map(|j| {
            let i = if j % 10 == 0 {
                j * 13 % FACTS
            } else {
                FACTS + j
            };
            (did(i), rkey(i))
        })
        .collect();
    let mut g = c.benchmark_group("facts");
    g.throughput(Throughput::Elements(ROWS));
    g.sample_size(10);
    for (name, memory) in [("memory", 1usize << 30), ("spilled", 64 << 20)] {
        let f = load(memory);
        g.bench_with_input(BenchmarkId::new("rows", name), &f, |b, f| {
            b.iter(|| {
                let mut hits = 0u32;
                for (d, r) in &rows {
                    hits += u32::from(f.account_deleted(d).expect("read").is_some());
                    hits += u32::from(
                        f.record_deleted(d, "app.bsky.feed.like", r)
                            .expect("read")
                            .is_some(),
                    );
                }
                assert_eq!(hits as u64, ROWS / 10);
                black_box(hits)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
