#!/usr/bin/env python3
"""Writes RecordBatch v2 golden vectors with kafka-python's record builder (kafka.record), an
implementation Cairn did not write. Each vector is NAME.bin (the batch) and NAME.json (the records it
must decode to). Re-run with: python3 make_vectors.py (needs kafka-python, python-snappy, lz4,
zstandard, crc32c). The checked-in outputs are what the tests use; compressed outputs depend on the
compressor versions, so regenerate only on purpose."""
import json
import os

from kafka.record.default_records import DefaultRecordBatchBuilder as B

CODECS = {"none": B.CODEC_NONE, "gzip": B.CODEC_GZIP, "snappy": B.CODEC_SNAPPY,
          "lz4": B.CODEC_LZ4, "zstd": B.CODEC_ZSTD}
BASE_TS = 1_700_000_000_000


def records():
    out = []
    for i in range(40):
        key = None if i % 7 == 3 else ("key-%d" % (i % 5)).encode()
        value = None if i % 11 == 5 else (("value %d " % i) * (1 + i % 4)).encode()
        headers = [] if i % 3 else [("trace-id", ("t%d" % i).encode()), ("empty", b""), ("null", None)]
        # Timestamps move backwards now and then: deltas may be negative.
        ts = BASE_TS + i * 13 - (50 if i % 9 == 8 else 0)
        out.append((i, ts, key, value, headers))
    return out


def hexor(b):
    return None if b is None else b.hex()


def write(name, codec, producer=(-1, -1, -1), transactional=False):
    builder = B(magic=2, compression_type=codec, is_transactional=transactional,
                producer_id=producer[0], producer_epoch=producer[1], base_sequence=producer[2],
                batch_size=1 << 20)
    expect = []
    for offset, ts, key, value, headers in records():
        builder.append(offset, timestamp=ts, key=key, value=value, headers=headers)
        expect.append({"offset": offset, "timestamp": ts, "key": hexor(key), "value": hexor(value),
                       "headers": [[k, hexor(v)] for k, v in headers]})
    batch = bytes(builder.build())
    assert (batch[22] & 0x07) == codec, "%s: kafka-python fell back to no compression" % name
    with open(name + ".bin", "wb") as f:
        f.write(batch)
    with open(name + ".json", "w") as f:
        json.dump({"producer_id": producer[0], "producer_epoch": producer[1],
                   "base_sequence": producer[2], "transactional": transactional,
                   "records": expect}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    for name, codec in CODECS.items():
        write(name, codec)
    write("none-idempotent", B.CODEC_NONE, producer=(4242, 3, 1000))
    write("zstd-transactional", B.CODEC_ZSTD, producer=(77, 0, 0), transactional=True)
