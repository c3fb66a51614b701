"""Big inputs: zstd decompression in bounded memory and linear time, and records longer than
--max-record-bytes refused (or skipped and counted) without being read whole."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tracemalloc
from collections import Counter

import pytest
import zstandard

from pack import format as F
from pack.cli import build_main
from pack.config import MAX_RECORD_BYTES_DEFAULT, parse_record_bytes
from pack.errors import PacktrainError
from pack.sources import MAX_RECORD_BYTES, _ZstdRaw, iter_raw_lines, iter_records


def read_all(raw, size: int) -> tuple[int, int]:
    """Read a raw stream to its end with reads of ``size`` bytes: (bytes, largest read)."""
    buf = bytearray(size)
    total = largest = 0
    while n := raw.readinto(buf):
        total += n
        largest = max(largest, n)
    return total, largest


# ---------------------------------------------------------------- zstd

def test_zstd_expanding_frame_is_read_in_bounded_memory():
    # 16 MiB of one line from a ~1 KB file: the old reader held each decompress() output whole
    # (all 16 MiB) and copied what was left of it on every read (quadratic in the line)
    body = b'{"text": "' + b"a " * (8 << 20) + b'"}\n'
    z = zstandard.ZstdCompressor(level=3).compress(body)
    assert len(z) < len(body) // 1000
    tracemalloc.start()
    try:
        total, largest = read_all(_ZstdRaw(io.BytesIO(z)), 256 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == len(body) and largest <= 256 << 10
    assert peak < 2 << 20, peak  # the reads' buffer is the caller's; nothing grows with the line


def test_zstd_reads_every_compressed_byte_once():
    # linear: the compressed file is read once, in pieces of the read size, however the
    # output is read (here in small reads over many frames and blocks)
    rng = random.Random(0)
    words = [b"alpha", b"beta", b"gamma", b"delta", os.urandom(3).hex().encode()]
    body = b" ".join(rng.choice(words) for _ in range(400_000)) + b"\n"
    z = b"".join(zstandard.ZstdCompressor(level=1).compress(body[i:i + 500_000])
                 for i in range(0, len(body), 500_000))

    class Counting(io.BytesIO):
        reads = 0
        given = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.reads += 1
            Counting.given += len(data)
            return data

    total, largest = read_all(_ZstdRaw(Counting(z), chunk=4096), 1000)
    assert total == len(body) and largest <= 1000
    assert Counting.given == len(z)
    assert Counting.reads <= len(z) // 4096 + 3


def frames() -> list[bytes]:
    """zstd frames of every kind of header and block: with and without checksum and content
    size, empty, multi-block, raw (incompressible) and RLE blocks, and a skippable frame."""
    rng = random.Random(1)
    noise = bytes(rng.getrandbits(8) for _ in range(3000))
    return [
        zstandard.ZstdCompressor(write_checksum=True).compress(b'{"a": 1}\n'),
        zstandard.ZstdCompressor(write_content_size=False).compress(b'{"b": 2}\n' * 40),
        zstandard.ZstdCompressor().compress(b""),
        (0x184D2A5A).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"skip!",
        zstandard.ZstdCompressor(write_checksum=True).compress(noise),
        zstandard.ZstdCompressor(level=1).compress(b"x" * 300_000 + b"\n"),
    ]


def test_zstd_truncated_anywhere_is_an_error_and_frame_ends_are_not():
    parts = frames()
    data = b"".join(parts)
    ends = [sum(map(len, parts[:i])) for i in range(len(parts) + 1)]
    plain = [b"" if p.startswith(b"\x5a\x2a\x4d\x18")  # the skippable frame
             else zstandard.ZstdDecompressor().decompressobj().decompress(p) for p in parts]
    expected = {end: b"".join(plain[:i]) for i, end in enumerate(ends)}
    # every cut in the small frames, and a spread of cuts in the big ones
    cuts = list(range(0, len(data) - len(parts[-1]) - len(parts[-2]) + 40)) + \
        list(range(len(data) - len(parts[-1]) - len(parts[-2]), len(data) + 1, 7)) + [len(data)]
    for cut in sorted(set(cuts)):
        raw = _ZstdRaw(io.BytesIO(data[:cut]), chunk=5)
        if cut in expected:
            got = bytearray()
            buf = bytearray(777)
            while n := raw.readinto(buf):
                got += buf[:n]
            assert bytes(got) == expected[cut], cut
        else:
            with pytest.raises(zstandard.ZstdError):
                read_all(raw, 777)


def test_truncated_zstd_file_names_the_file(tmp_path):
    body = b"".join(json.dumps({"text": f"line {i} " * 50}).encode() + b"\n"
                    for i in range(2000))
    z = zstandard.ZstdCompressor().compress(body[:50_000]) + \
        zstandard.ZstdCompressor().compress(body[50_000:])
    p = tmp_path / "t.jsonl.zst"
    p.write_bytes(z[:-3])
    with pytest.raises(PacktrainError, match=r"t\.jsonl\.zst:\d+: corrupt or truncated zstd data "
                                             r"after line \d+ \(truncated zstd frame"):
        list(iter_records(p))
    p.write_bytes(z)
    assert len(list(iter_records(p))) == 2000


# ---------------------------------------------------------------- --max-record-bytes

def long_line_file(path, long_at: int, long_size: int, n: int = 6, newline_last=True):
    """JSON Lines of ``n`` small text records, line ``long_at`` (1-based) ``long_size`` bytes."""
    lines = [json.dumps({"text": f"record {i} " * 20}).encode() for i in range(1, n + 1)]
    pad = long_size - len(b'{"text": ""}')
    lines[long_at - 1] = b'{"text": "' + b"z" * pad + b'"}'
    data = b"\n".join(lines) + (b"\n" if newline_last else b"")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["l.jsonl", "l.jsonl.gz", "l.jsonl.zst", "l.json"])
def test_long_line_refused_or_skipped_and_the_rest_read(tmp_path, name):
    p = long_line_file(tmp_path / name, 3, 3 << 20)  # three pieces of passing over
    with pytest.raises(PacktrainError) as e:
        list(iter_records(p, max_record_bytes=64 << 10))
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: line of 3,145,729 bytes is longer than --max-record-bytes "
                          f"(64KiB)") and "--skip-invalid" in msg and "\n" not in msg
    skipped: Counter = Counter()
    got = list(iter_records(p, skip_invalid=True, skipped=skipped, max_record_bytes=64 << 10))
    assert [w.rsplit(":", 1)[1] for w, _ in got] == ["1", "2", "4", "5", "6"]
    assert [r["text"].split()[1] for _, r in got] == ["1", "2", "4", "5", "6"]
    assert skipped == {"too-large": 1}
    # a line of exactly the limit (line ending not counted) is read
    assert len(list(iter_records(p, max_record_bytes=3 << 20))) == 6
    with pytest.raises(PacktrainError, match=":3: line of"):
        list(iter_records(p, max_record_bytes=(3 << 20) - 1))


def test_long_last_line_without_newline(tmp_path):
    p = long_line_file(tmp_path / "e.jsonl", 6, 2_000_000, newline_last=False)
    lines = list(iter_raw_lines(p, max_record_bytes=1000))
    assert [n for n, _ in lines] == [1, 2, 3, 4, 5, 6]
    assert type(lines[-1][1]).__name__ == "LongLine" and lines[-1][1].size == 2_000_000


def test_long_line_is_never_held_whole(tmp_path):
    p = tmp_path / "big.jsonl.zst"
    line = b'{"text": "' + b"a " * (16 << 20) + b'"}\n'
    p.write_bytes(zstandard.ZstdCompressor().compress(line + b'{"text": "after"}\n'))
    tracemalloc.start()
    try:
        got = list(iter_raw_lines(p, max_record_bytes=256 << 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [n for n, _ in got] == [1, 2] and got[0][1].size == len(line)
    assert got[1][1] == b'{"text": "after"}\n'
    assert peak < 8 << 20, peak  # the limit and a piece of passing over, not 32 MiB


def test_max_record_bytes_values():
    assert parse_record_bytes(MAX_RECORD_BYTES_DEFAULT) == MAX_RECORD_BYTES == 16 << 20
    assert parse_record_bytes("64MB") == parse_record_bytes("64MiB") == 64 << 20
    assert parse_record_bytes("1.5KB") == 1536 and parse_record_bytes(5000) == 5000
    for bad in ("0", "-1", "lots", "1.5", "10 parsecs"):
        with pytest.raises(PacktrainError, match="--max-record-bytes"):
            parse_record_bytes(bad)


def test_pack_build_long_record(tmp_path, tokenizer_dir, capsys):
    src = long_line_file(tmp_path / "d.jsonl", 2, 200_000, n=40)
    out = tmp_path / "out"
    common = ["--quiet", "--tokenizer", str(tokenizer_dir), "--workers", "1",
              "--max-length", "256", "--max-record-bytes", "100KB"]
    assert build_main(common + [str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {src}:2: line of 200,001 bytes is longer than "
                          f"--max-record-bytes (100KiB)") and len(err.splitlines()) == 1
    assert not (out / "manifest.json").exists()
    assert build_main(common + ["--skip-invalid", str(src), str(out)]) == 0
    m = F.read_manifest(out)
    assert m["stats"]["skipped_invalid"] == {"too-large": 1}
    assert m["stats"]["records"] == 39 == m["sources"][0]["records"]
    assert m["arguments"]["max_record_bytes"] == "100KB"
    assert F.verify(out) == []
    # the default reads it
    out2 = tmp_path / "out2"
    assert build_main(common[:-2] + [str(src), str(out2)]) == 0
    m2 = F.read_manifest(out2)
    assert m2["stats"]["records"] == 40 and m2["arguments"]["max_record_bytes"] == "16MB"
    assert build_main(common[:-1] + ["0", str(src), str(tmp_path / "o3")]) == 2
    assert "error: --max-record-bytes '0': expected a size" in capsys.readouterr().err
