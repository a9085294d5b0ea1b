#![allow(missing_docs)]
//! Decode benchmarks on realistic `#commit` frames from the simulator (mean ≈ 5.5 KB, 4–17
//! blocks, Sync 1.1 shape) and the Jetstream lines of the same traffic.
//!
//! Also compares CBOR libraries on the same bytes: atlake's zero-copy reader, ciborium and
//! minicbor, walking whole frames and turning record blocks into JSON text.
//!
//! Run: `cargo bench --bench decode` (add `-- --quick` for a shorter run).

use atlake::decode::car::Car;
use atlake::decode::cbor::{JsonWriter, MAX_DEPTH, Reader};
use atlake::decode::events::{DecodeOptions, FrameDecoder};
use atlake::decode::frame::{Body, parse_frame};
use atlake::decode::jetstream::{JetstreamDecoder, JetstreamOptions};
use atlake::decode::json::write_str;
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

struct Data {
    frames: Vec<Vec<u8>>,
    records: Vec<Vec<u8>>,
    lines: Vec<Vec<u8>>,
    frame_bytes: u64,
    record_bytes: u64,
    line_bytes: u64,
}

fn data() -> Data {
    let mut t = Traffic::new(TrafficConfig {
        seed: 11,
        ..Default::default()
    });
    let mut frames = Vec::new();
    let mut lines = Vec::new();
    let mut records = Vec::new();
    while frames.len() < 2000 {
        let m = t.next_message();
        for (_, l) in m.jetstream_lines() {
            lines.push(l);
        }
        if let Ok((_, Body::Commit(c))) = parse_frame(&m.frame) {
            let car = Car::parse(c.blocks, false).unwrap();
            for op in &c.ops {
                if let Some(b) = op.cid.value().and_then(|cid| car.get(cid)) {
                    records.push(b.to_vec());
                }
            }
            frames.push(m.frame.clone());
        }
    }
    let sum = |v: &Vec<Vec<u8>>| v.iter().map(|x| x.len() as u64).sum();
    Data {
        frame_bytes: sum(&frames),
        record_bytes: sum(&records),
        line_bytes: sum(&lines),
        frames,
        records,
        lines,
    }
}

fn frames(c: &mut Criterion) {
    let d = data();
    eprintln!(
        "{} commit frames, mean {} B; {} records, mean {} B; {} Jetstream lines, mean {} B",
        d.frames.len(),
        d.frame_bytes / d.frames.len() as u64,
        d.records.len(),
        d.record_bytes / d.records.len() as u64,
        d.lines.len(),
        d.line_bytes / d.lines.len() as u64
    );
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(d.frames.len() as u64));
    g.bench_function("parse_only", |b| {
        b.iter(|| {
            for f in &d.frames {
                let (_, body) = parse_frame(f).unwrap();
                if let Body::Commit(c) = body {
                    black_box(Car::parse(c.blocks, false).unwrap());
                }
            }
        })
    });
    let mut full = FrameDecoder::new(DecodeOptions {
        verify_hashes: true,
    });
    let mut out = Vec::new();
    g.bench_function("full_decode_verified", |b| {
        b.iter(|| {
            for f in &d.frames {
                out.clear();
                full.decode(f, &mut out);
                black_box(&out);
            }
        })
    });
    let mut fast = FrameDecoder::new(DecodeOptions {
        verify_hashes: false,
    });
    g.bench_function("full_decode_unverified", |b| {
        b.iter(|| {
            for f in &d.frames {
                out.clear();
                fast.decode(f, &mut out);
                black_box(&out);
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("frames_bytes");
    g.throughput(Throughput::Bytes(d.frame_bytes));
    g.bench_function("parse_only", |b| {
        b.iter(|| {
            for f in &d.frames {
                let (_, body) = parse_frame(f).unwrap();
                if let Body::Commit(c) = body {
                    black_box(Car::parse(c.blocks, false).unwrap());
                }
            }
        })
    });
    g.bench_function("full_decode_verified", |b| {
        b.iter(|| {
            for f in &d.frames {
                out.clear();
                full.decode(f, &mut out);
                black_box(&out);
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("jetstream");
    g.throughput(Throughput::Elements(d.lines.len() as u64));
    let mut js = JetstreamDecoder::new(JetstreamOptions::default());
    g.bench_function("lines_to_model", |b| {
        b.iter(|| {
            for l in &d.lines {
                black_box(js.decode(l));
            }
        })
    });
    let mut jsn = JetstreamDecoder::new(JetstreamOptions { normalize: true });
    g.bench_function("lines_to_model_normalized", |b| {
        b.iter(|| {
            for l in &d.lines {
                black_box(jsn.decode(l));
            }
        })
    });
    g.finish();

    // --- CBOR libraries side by side ---
    let mut g = c.benchmark_group("cbor_walk_frames");
    g.throughput(Throughput::Bytes(d.frame_bytes));
    g.bench_function(BenchmarkId::new("walk", "atlake"), |b| {
        b.iter(|| {
            for f in &d.frames {
                let mut r = Reader::new(f);
                r.skip(MAX_DEPTH).unwrap();
                r.skip(MAX_DEPTH).unwrap();
            }
        })
    });
    g.bench_function(BenchmarkId::new("walk", "minicbor"), |b| {
        b.iter(|| {
            for f in &d.frames {
                let mut dec = minicbor::Decoder::new(f);
                dec.skip().unwrap();
                dec.skip().unwrap();
            }
        })
    });
    g.bench_function(BenchmarkId::new("walk", "ciborium_value"), |b| {
        b.iter(|| {
            for f in &d.frames {
                let mut cur = std::io::Cursor::new(f.as_slice());
                let h: ciborium::Value = ciborium::from_reader(&mut cur).unwrap();
                let body: ciborium::Value = ciborium::from_reader(&mut cur).unwrap();
                black_box((h, body));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("cbor_records_to_json");
    g.throughput(Throughput::Elements(d.records.len() as u64));
    let mut w = JsonWriter::new();
    let mut buf = Vec::new();
    g.bench_function(BenchmarkId::new("to_json", "atlake"), |b| {
        b.iter(|| {
            for r in &d.records {
                buf.clear();
                w.record_to_json(r, &mut buf).unwrap();
            }
        })
    });
    g.bench_function(BenchmarkId::new("to_json", "ciborium"), |b| {
        b.iter(|| {
            for r in &d.records {
                buf.clear();
                let v: ciborium::Value = ciborium::from_reader(r.as_slice()).unwrap();
                ciborium_json(&v, &mut buf);
            }
        })
    });
    g.bench_function(BenchmarkId::new("to_json", "minicbor"), |b| {
        b.iter(|| {
            for r in &d.records {
                buf.clear();
                let mut dec = minicbor::Decoder::new(r);
                minicbor_json(&mut dec, &mut buf);
            }
        })
    });
    g.finish();

    // correctness of the alternatives on the same data (so the comparison is like for like)
    let mut a = Vec::new();
    let mut b2 = Vec::new();
    let mut b3 = Vec::new();
    let mut same = 0;
    for r in &d.records {
        a.clear();
        b2.clear();
        b3.clear();
        w.record_to_json(r, &mut a).unwrap();
        let v: ciborium::Value = ciborium::from_reader(r.as_slice()).unwrap();
        ciborium_json(&v, &mut b2);
        minicbor_json(&mut minicbor::Decoder::new(r), &mut b3);
        let pa: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let pb: serde_json::Value = serde_json::from_slice(&b2).unwrap();
        let pc: serde_json::Value = serde_json::from_slice(&b3).unwrap();
        if pa == pb && pa == pc {
            same += 1;
        }
    }
    eprintln!(
        "alternatives agree with atlake on {same}/{} records",
        d.records.len()
    );
}

fn link_json(bytes: &[u8], out: &mut Vec<u8>) {
    let cid = atlake::decode::cid::Cid::from_link_bytes(bytes).unwrap();
    out.extend_from_slice(b"{\"$link\":\"");
    cid.write_str(out);
    out.extend_from_slice(b"\"}");
}

fn bytes_json(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"$bytes\":\"");
    out.extend_from_slice(data_encoding::BASE64_NOPAD.encode(b).as_bytes());
    out.extend_from_slice(b"\"}");
}

fn ciborium_json(v: &ciborium::Value, out: &mut Vec<u8>) {
    use ciborium::Value as V;
    match v {
        V::Integer(i) => out.extend_from_slice(i128::from(*i).to_string().as_bytes()),
        V::Bytes(b) => bytes_json(b, out),
        V::Text(s) => write_str(out, s),
        V::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        V::Null => out.extend_from_slice(b"null"),
        V::Tag(42, inner) => match inner.as_ref() {
            V::Bytes(b) => link_json(b, out),
            _ => panic!("bad link"),
        },
        V::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                ciborium_json(x, out);
            }
            out.push(b']');
        }
        V::Map(m) => {
            let mut entries: Vec<(&str, &V)> =
                m.iter().map(|(k, v)| (k.as_text().unwrap(), v)).collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, x)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                ciborium_json(x, out);
            }
            out.push(b'}');
        }
        _ => panic!("unsupported"),
    }
}

fn minicbor_json(d: &mut minicbor::Decoder<'_>, out: &mut Vec<u8>) {
    use minicbor::data::Type as T;
    match d.datatype().unwrap() {
        T::U8 | T::U16 | T::U32 | T::U64 => {
            out.extend_from_slice(d.u64().unwrap().to_string().as_bytes())
        }
        T::I8 | T::I16 | T::I32 | T::I64 => {
            out.extend_from_slice(d.i64().unwrap().to_string().as_bytes())
        }
        T::Bytes => bytes_json(d.bytes().unwrap(), out),
        T::String => write_str(out, d.str().unwrap()),
        T::Bool => out.extend_from_slice(if d.bool().unwrap() { b"true" } else { b"false" }),
        T::Null => {
            d.skip().unwrap();
            out.extend_from_slice(b"null")
        }
        T::Tag => {
            d.tag().unwrap();
            link_json(d.bytes().unwrap(), out)
        }
        T::Array => {
            let n = d.array().unwrap().unwrap();
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                minicbor_json(d, out);
            }
            out.push(b']');
        }
        T::Map => {
            let n = d.map().unwrap().unwrap();
            let mut entries: Vec<(&str, Vec<u8>)> = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let k = d.str().unwrap();
                let mut v = Vec::new();
                minicbor_json(d, &mut v);
                entries.push((k, v));
            }
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                out.extend_from_slice(v);
            }
            out.push(b'}');
        }
        t => panic!("unsupported {t:?}"),
    }
}

criterion_group!(benches, frames);
criterion_main!(benches);
