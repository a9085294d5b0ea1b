#!/usr/bin/env python3
"""The Python baseline for firehose ingest (scripts/bench-firehose): libipld + pyarrow.

Reads a length-prefixed capture of `subscribeRepos` frames ([u32 LE length][frame]), and for
each `#commit` parses the CAR slice, checks every block's sha-256 against its CID, decodes each
created or updated record with libipld and writes rows (seq, did, time, collection, rkey,
operation, cid, record JSON) as zstd Parquet partitioned by collection and hour, as atlake
does. `#identity`, `#account` and `#sync` frames become rows too (no record).

    firehose-sink.py CAPTURE OUT_DIR

Prints one JSON line: frames, rows, blocks verified, seconds.
"""
import base64
import hashlib
import json
import os
import struct
import sys
import time
from collections import defaultdict

import libipld
import pyarrow as pa
import pyarrow.parquet as pq

FLUSH_ROWS = 200_000
B32 = "abcdefghijklmnopqrstuvwxyz234567"


def varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7


def cid_text(raw):
    # multibase base32 (lower, no padding), as atproto writes CIDs
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def car_blocks(car):
    """Every block of a CAR slice by CID bytes, each hash checked."""
    n, i = varint(car, 0)
    i += n  # the header (roots) is not needed here
    out = {}
    while i < len(car):
        n, i = varint(car, i)
        end = i + n
        start = i
        _version, i = varint(car, i)
        _codec, i = varint(car, i)
        code, i = varint(car, i)
        size, i = varint(car, i)
        digest = car[i : i + size]
        i += size
        cid = car[start:i]
        block = car[i:end]
        if code != 0x12 or hashlib.sha256(block).digest() != digest:
            raise ValueError("a block does not match its CID")
        out[cid] = block
        i = end
    return out


def plain(v):
    """A decoded DAG-CBOR value as JSON (bytes as {"$bytes"}, CIDs as {"$link"})."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, bytes):
        if v[:1] == b"\x01":
            return {"$link": cid_text(v)}
        return {"$bytes": base64.b64encode(v).decode()}
    return v


def main():
    capture, out_dir = sys.argv[1], sys.argv[2]
    started = time.time()
    parts = defaultdict(lambda: defaultdict(list))
    files = defaultdict(int)
    frames = rows = verified = 0

    def flush(key):
        cols = parts.pop(key)
        coll, hour = key
        d = os.path.join(out_dir, f"collection={coll}", f"hour={hour}")
        os.makedirs(d, exist_ok=True)
        pq.write_table(pa.table(cols), os.path.join(d, f"part-{files[key]}.parquet"), compression="zstd")
        files[key] += 1

    pending = 0
    f = open(capture, "rb", buffering=1 << 20)
    while True:
        head = f.read(4)
        if len(head) < 4:
            break
        (n,) = struct.unpack("<I", head)
        frame = f.read(n)
        frames += 1
        header, body = libipld.decode_dag_cbor_multi(frame)
        kind = header.get("t")
        did = body.get("repo") or body.get("did")
        t = body.get("time", "")
        hour = t[:13]
        seq = body.get("seq")
        if kind == "#commit":
            blocks = car_blocks(body["blocks"])
            verified += len(blocks)
            for op in body["ops"]:
                coll, _, rkey = op["path"].partition("/")
                cid = op.get("cid")
                record = None
                if cid is not None and op["action"] != "delete":
                    record = json.dumps(plain(libipld.decode_dag_cbor(blocks[cid])))
                key = (coll, hour)
                p = parts[key]
                p["seq"].append(seq)
                p["did"].append(did)
                p["time"].append(t)
                p["rkey"].append(rkey)
                p["operation"].append(op["action"])
                p["cid"].append(cid_text(cid) if cid is not None else None)
                p["record"].append(record)
                rows += 1
                pending += 1
        else:
            key = ("_" + (kind or "unknown").lstrip("#"), hour)
            p = parts[key]
            p["seq"].append(seq)
            p["did"].append(did)
            p["time"].append(t)
            rows += 1
            pending += 1
        if pending >= FLUSH_ROWS:
            for key in list(parts):
                flush(key)
            pending = 0
    f.close()
    for key in list(parts):
        flush(key)
    print(json.dumps({"frames": frames, "rows": rows, "blocks_verified": verified,
                      "seconds": round(time.time() - started, 2)}))


if __name__ == "__main__":
    main()
