"""Hostile manifests: seeded random mutations of a valid manifest.json never give a traceback,
and never a silently wrong result.

Each case mutates a copy of a real dataset's manifest and runs pack-verify (its command-line
entry point, in-process). Every case must end with exit 0 or 1 and one-line messages, without a
traceback. Mutations that change what the dataset means (a shard's hash, size, packs or tokens,
its path, the totals, the format, the context length or vocabulary below what the packs hold,
duplicate keys, cut-off text) must be reported (exit 1). Mutations whose effect depends on the
field (a value of another type, deep nesting, a deleted key, random bytes) must merely end
cleanly. The number of cases per family is printed at the end (docs/testing.md lists them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pack.cli import verify_main

CASES: Counter = Counter()
SEED = 20261202


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\n[hostile manifests] cases run: {dict(CASES)}; total {sum(CASES.values())}")


@pytest.fixture(scope="module")
def dataset(chat_shards) -> Path:
    return chat_shards


def pack_verify(ds: Path) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = verify_main([str(ds), "--quiet"])
    return rc, buf.getvalue()


def ends_cleanly(rc: int, out: str, case: str) -> None:
    assert rc in (0, 1, 2), (case, rc, out)
    assert "Traceback" not in out, (case, out)
    for line in filter(str.strip, out.splitlines()):  # each problem one line, then a summary
        assert line.startswith(("FAIL ", "error: ")) or line.endswith("problem(s) found"), \
            (case, out)


# ---------------------------------------------------------------- mutations that must be caught

def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _delete(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    del doc[path[-1]]


def meaning_changes(m: dict, rng: random.Random) -> tuple[str, dict]:
    """One mutation that changes what the dataset is; pack-verify must report it."""
    m = copy.deepcopy(m)
    i = rng.randrange(len(m["shards"]))
    s = m["shards"][i]
    kind = rng.choice(["sha256", "bytes", "packs", "tokens", "path-other", "path-missing",
                       "path-escape", "path-dup", "stats", "format", "version", "max_length",
                       "vocab"])
    if kind == "sha256":
        h = list(s["sha256"])
        j = rng.randrange(len(h))
        h[j] = "0" if h[j] != "0" else "1"
        s["sha256"] = "".join(h)
    elif kind in ("bytes", "packs", "tokens"):
        s[kind] = max(0, s[kind] + rng.choice([-1, 1, 7, -s[kind], 10 ** rng.randint(1, 12)]))
    elif kind == "path-other":
        others = [o["path"] for o in m["shards"] if o["path"] != s["path"]]
        s["path"] = rng.choice(others)
    elif kind == "path-missing":
        s["path"] = f"shard-{rng.randrange(10 ** 6, 10 ** 7)}.arrow"
    elif kind == "path-escape":
        s["path"] = rng.choice(["../" + s["path"], "/etc/passwd", "a/../../x.arrow",
                                "C:/x.arrow", "s3://b/x.arrow", "", "\\\\host\\x"])
    elif kind == "path-dup":
        m["shards"].append(dict(s))
        for key in ("packs", "tokens"):
            m["stats"][key] += s[key]
    elif kind == "stats":
        key = rng.choice(["packs", "tokens", "samples_packed", "label_tokens"])
        m["stats"][key] += rng.choice([-1, 1, 1000])
    elif kind == "format":
        m["format"] = rng.choice(["", "packtrain", "other", None, 1])
    elif kind == "version":
        m["format_version"] = rng.choice(["99.0", "3.0", "x", "", "2", None, 2.0])
    elif kind == "max_length":
        m["max_length"] = rng.choice([1, 2, 16])
    elif kind == "vocab":
        m["tokenizer"]["vocab_size"] = rng.choice([1, 2, 100])
    return kind, m


def test_meaning_changes_are_reported(dataset, tmp_path):
    base = json.loads((dataset / "manifest.json").read_text())
    rng = random.Random(SEED)
    ds = Path(shutil.copytree(dataset, tmp_path / "ds"))
    for n in range(300):
        kind, m = meaning_changes(base, rng)
        if m == base:
            continue
        (ds / "manifest.json").write_text(json.dumps(m))
        rc, out = pack_verify(ds)
        ends_cleanly(rc, out, f"{n}:{kind}")
        assert rc == 1, (n, kind, out)
        CASES["manifest: meaning changed"] += 1


# ---------------------------------------------------------------- mutations that must end cleanly

def _junk(rng: random.Random, depth: int = 0):
    kinds = ["int", "neg", "float", "nan", "str", "null", "bool", "list", "dict", "huge"]
    k = rng.choice(kinds if depth < 3 else kinds[:7])
    return {"int": lambda: rng.randrange(10 ** 6), "neg": lambda: -rng.randrange(1, 10 ** 6),
            "float": lambda: rng.random() * 1e6, "nan": lambda: rng.choice(["NaN", "Infinity"]),
            "str": lambda: rng.choice(["", "x", "../x", "\u0000", "é" * 5]),
            "null": lambda: None, "bool": lambda: rng.random() < 0.5,
            "list": lambda: [_junk(rng, depth + 1) for _ in range(rng.randrange(3))],
            "dict": lambda: {str(rng.randrange(9)): _junk(rng, depth + 1)
                             for _ in range(rng.randrange(3))},
            "huge": lambda: 10 ** rng.randrange(19, 400)}[k]()


def structural_changes(text: str, m: dict, rng: random.Random) -> tuple[str, str, bool]:
    """(kind, new manifest text, must_fail)."""
    kind = rng.choice(["type", "delete", "nest", "bytes", "truncate", "duplicate-key", "add"])
    if kind in ("type", "delete", "nest", "add"):
        doc = copy.deepcopy(m)
        paths = [p for p, _ in _paths(doc) if p]
        path = rng.choice(paths)
        if kind == "type":
            _set(doc, path, _junk(rng))
        elif kind == "delete":
            _delete(doc, path)
        elif kind == "add":
            target = rng.choice([p for p, v in _paths(doc) if isinstance(v, dict)])
            _set(doc, target + (f"extra_{rng.randrange(100)}",), _junk(rng))
        new = json.dumps(doc)
        if kind == "nest":
            depth = rng.choice([50, 500, 5_000, 100_000])
            marker = json.dumps(doc["shards"][0]["path"])
            nested = "[" * depth + "1" + "]" * depth
            new = new.replace(marker, nested, 1)
        return kind, new, False
    if kind == "bytes":
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return kind, b.decode("latin-1"), False
    if kind == "truncate":
        body = text.rstrip()
        return kind, body[:rng.randrange(len(body) - 1)], True
    keys = [k for k in m if isinstance(k, str)]
    k = rng.choice(keys)
    new = text.replace(f'"{k}":', f'"{k}": {json.dumps(_junk(rng, 3))}, "{k}":', 1)
    return kind, new, True


def test_structural_changes_end_cleanly(dataset, tmp_path):
    text = (dataset / "manifest.json").read_text()
    base = json.loads(text)
    rng = random.Random(SEED + 1)
    ds = Path(shutil.copytree(dataset, tmp_path / "ds"))
    for n in range(450):
        kind, new, must_fail = structural_changes(text, base, rng)
        (ds / "manifest.json").write_text(new, encoding="latin-1" if kind == "bytes" else "utf-8")
        rc, out = pack_verify(ds)
        ends_cleanly(rc, out, f"{n}:{kind}")
        if must_fail:
            assert rc == 1, (n, kind, out)
        CASES[f"manifest: {kind}"] += 1
