"""Safety checks train-run makes before the first step: refuse data the model cannot train on.

    warnings = preflight(shards_dir, manifest, model, model_path,
                         full_checksums=args.verify,
                         allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)

What is refused (PacktrainError, or FormatError for a broken dataset; one line naming the path,
what is wrong and what to do), in the order checked, cheapest first:

1. ``check_tokenizer``    the tokenizer in the model directory must have the fingerprint the
                          dataset was packed with (``manifest.tokenizer.fingerprint``: token-to-id
                          map, special tokens, chat template). A model directory without tokenizer
                          files is refused too, since nothing then shows the ids mean the same.
                          ``allow_tokenizer_mismatch`` turns both into warnings.
2. ``check_token_range``  the manifest's vocab_size must fit the model's input embedding rows and
                          its output (lm_head) rows; with the allow flag only the ids actually
                          present must fit (step 4).
3. ``check_dataset``      every shard's size, Arrow schema and row count against the manifest
                          (``pack.format.verify``; sha256 of every byte too with
                          ``full_checksums``), then every pack invariant of DESIGN.md over every
                          pack, vectorised with numpy (``scan_invariants``; about 50x faster than
                          the per-pack loop; a failing shard is re-checked pack by pack with
                          ``pack.format.check_pack`` so messages name the shard, row and rule).
4. the largest token id actually present must be below the embedding rows (always).

Warnings (returned, for the caller to log): the dataset's max_length exceeds the model's
max_position_embeddings; any check the allow flag downgraded.

Nothing here uses torch.distributed: call it on every rank (each scans the shards; they are
memory-mapped and shared by the page cache) or on rank 0 only before ranks meet in a collective
(the launcher ends the other ranks when rank 0 exits with an error).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pack.errors import FormatError, PacktrainError
from pack.tokenize.loading import load_tokenizer, tokenizer_fingerprint
from pack.format import check_pack, COLUMNS, IGNORE_INDEX, open_shard, verify

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
CHUNK_TOKENS = 1 << 22  # tokens per vectorised block: bounds temporary memory to ~100 MB


@dataclass
class ScanResult:
    """What the invariant scan saw, over all shards."""
    packs: int = 0
    tokens: int = 0
    samples: int = 0
    label_tokens: int = 0
    min_token_id: int | None = None
    max_token_id: int | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------- tokenizer

def has_tokenizer(model_path: str | os.PathLike) -> bool:
    p = Path(model_path)
    if p.is_file():
        return p.suffix == ".json"
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def _short(fp: str | None) -> str:
    if not fp:
        return "none"
    return fp if len(fp) <= 23 else fp[:23] + "…"  # "sha256:" + 16 hex digits


def check_tokenizer(shards_dir: str | os.PathLike, manifest: dict, model_path: str | os.PathLike,
                    allow_tokenizer_mismatch: bool = False) -> list[str]:
    """Refuse a model whose tokenizer is not the one the dataset was packed with (or that has
    none). Returns warnings when `allow_tokenizer_mismatch` lets a problem through."""
    tok = manifest["tokenizer"]
    want = tok.get("fingerprint")
    name = tok.get("name") or tok.get("path")
    allow = "pass --allow-tokenizer-mismatch"
    if not has_tokenizer(model_path):
        msg = (f"model dir {model_path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so "
               f"nothing shows its token ids mean what dataset {shards_dir} (packed with tokenizer "
               f"{name}, fingerprint {_short(want)}) means; copy that tokenizer into "
               f"{model_path} or {allow}")
        if allow_tokenizer_mismatch:
            return [msg.split("; copy")[0] + " (allowed by --allow-tokenizer-mismatch)"]
        raise PacktrainError(msg)
    try:
        got = tokenizer_fingerprint(load_tokenizer(model_path))
    except PacktrainError as e:
        if allow_tokenizer_mismatch:
            return [f"{e} (allowed by --allow-tokenizer-mismatch)"]
        raise PacktrainError(f"{e}; or {allow}") from None
    if got == want:
        return []
    msg = (f"tokenizer mismatch: dataset {shards_dir} was packed with tokenizer {name} "
           f"(fingerprint {_short(want)}), model dir {model_path} has fingerprint {_short(got)}; "
           f"re-pack with --tokenizer {model_path} or {allow}")
    if allow_tokenizer_mismatch:
        return [msg.split("; re-pack")[0] + " (allowed by --allow-tokenizer-mismatch)"]
    raise PacktrainError(msg)


# ---------------------------------------------------------------- vocabulary

def embedding_rows(model) -> tuple[int, int | None]:
    """(input embedding rows, output projection rows or None). Reads the modules' declared sizes,
    so it is right under ZeRO-3, where the weights themselves are partitioned to shape (0,)."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if rows is None:
        w = getattr(emb, "weight", None)
        rows = tuple(getattr(w, "ds_shape", None) or w.shape)[0]
    out_rows = None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None:
        out_rows = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
    return int(rows), (int(out_rows) if out_rows is not None else None)


def check_token_range(shards_dir: str | os.PathLike, manifest: dict, model,
                      max_token_id: int | None = None,
                      allow_tokenizer_mismatch: bool = False) -> list[str]:
    """Every token id must index a row of the input embedding and of the output projection
    (labels index the logits). Checks the manifest's vocab_size (every id the tokenizer can
    make) unless the tokenizer was allowed to differ, and `max_token_id` when given."""
    rows, out_rows = embedding_rows(model)
    limit = min(rows, out_rows) if out_rows else rows
    which = "input embedding" if limit == rows else "output (lm_head)"
    vocab = manifest["tokenizer"].get("vocab_size")
    warnings = []
    if max_token_id is not None and max_token_id >= limit:
        raise PacktrainError(f"dataset {shards_dir} holds token id {max_token_id} but the model's "
                             f"{which} has only {limit} rows (ids 0..{limit - 1}); use a model "
                             f"with a vocabulary of at least {max_token_id + 1} (resize its "
                             f"embeddings) or re-pack with the model's tokenizer")
    if vocab is not None and int(vocab) > limit:
        msg = (f"dataset {shards_dir} was packed with a tokenizer of {vocab} ids but the model's "
               f"{which} has only {limit} rows; resize the model's embeddings to at least {vocab} "
               f"or re-pack with the model's tokenizer")
        if not allow_tokenizer_mismatch:
            raise PacktrainError(msg)
        warnings.append(msg.split("; resize")[0] + " (allowed: only the ids present are checked)")
    return warnings


def check_context_length(manifest: dict, model) -> list[str]:
    cfg = getattr(model, "config", None)
    maxpos = getattr(cfg, "max_position_embeddings", None)
    L = int(manifest["max_length"])
    if maxpos and L > int(maxpos):
        return [f"packs are up to {L} tokens but the model's max_position_embeddings is {maxpos}; "
                f"positions restart per sample, so only samples longer than {maxpos} are at risk"]
    return []


# ---------------------------------------------------------------- dataset

def _rows_of(token_idx: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, token_idx, side="right") - 1


def _bad_rows_block(off: np.ndarray, ids: np.ndarray, lab: np.ndarray, pos: np.ndarray,
                    cu_off: np.ndarray, cu: np.ndarray, si_counts: np.ndarray,
                    other_offs: list[np.ndarray], max_length: int,
                    vocab: int | None) -> np.ndarray:
    """Rows (0-based within the block) that break any pack invariant. `off`/`cu_off` are the
    block's offsets rebased to 0; value arrays are the block's slices."""
    n = len(off) - 1
    T = np.diff(off)
    bad = np.zeros(n, dtype=bool)
    for o in other_offs:  # labels / position_ids lengths
        bad |= np.diff(o) != T
    if bad.any():  # the element-wise checks below need the columns aligned token by token
        return np.nonzero(bad)[0]
    # structure: lengths, cu_seqlens = [0, ..., T] strictly increasing, one sample_index each
    ncu = np.diff(cu_off)
    sbad = (T == 0) | (T > max_length) | (ncu < 2) | (si_counts != ncu - 1)
    if len(cu):
        first = cu[np.minimum(cu_off[:-1], len(cu) - 1)]
        last = cu[np.clip(cu_off[1:] - 1, 0, len(cu) - 1)]
        sbad |= (first != 0) | (last != T)
        d = np.diff(cu.astype(np.int64))
        crossing = np.zeros(len(d), dtype=bool)  # d[i] spanning one row's last and the next's first
        ends = cu_off[1:-1] - 1
        crossing[ends[(ends >= 0) & (ends < len(d))]] = True
        viol = np.nonzero((d <= 0) & ~crossing)[0]
        if len(viol):
            sbad[_rows_of(viol, cu_off)] = True
    else:
        sbad[:] = True
    bad |= sbad
    # tokens: in range; labels -100 or equal to the input token
    if len(ids):
        wrong = ids < 0
        if vocab is not None:
            wrong |= ids >= vocab
        wrong |= (lab != IGNORE_INDEX) & (lab != ids)
        idx = np.nonzero(wrong)[0]
        if len(idx):
            bad[_rows_of(idx, off)] = True
    # positions restart at each sample start, where the label is -100: well-formed rows only
    ok = ~sbad
    if not ok.any():
        return np.nonzero(bad)[0]
    cu_row = np.repeat(np.arange(n), ncu)
    is_last = np.zeros(len(cu), dtype=bool)
    is_last[cu_off[1:][ncu > 0] - 1] = True
    take = ~is_last & ok[cu_row]                      # each sample start of a well-formed row
    starts = off[cu_row[take]] + cu[take].astype(np.int64)
    nxt = np.nonzero(take)[0] + 1
    lens = cu[nxt].astype(np.int64) - cu[take].astype(np.int64)
    tok = np.repeat(starts, lens) + _ranges(lens)     # every token index of the well-formed rows
    expected = tok - np.repeat(starts, lens)
    idx = tok[pos[tok] != expected]
    if len(idx):
        bad[_rows_of(idx, off)] = True
    idx = starts[lab[starts] != IGNORE_INDEX]
    if len(idx):
        bad[_rows_of(idx, off)] = True
    return np.nonzero(bad)[0]


def _ranges(lens: np.ndarray) -> np.ndarray:
    """concatenate(arange(l) for l in lens), vectorised."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(total, dtype=np.int64) - starts


def scan_invariants(table, name: str, max_length: int, vocab: int | None,
                    max_problems: int = 20) -> tuple[list[str], ScanResult]:
    """Check every pack of one shard (an Arrow table as pack.format.open_shard returns it)
    against the invariants of pack.format.check_pack, vectorised; returns (problems, counts)."""
    cols = {c: table.column(c).combine_chunks() for c in COLUMNS}
    offs = {c: cols[c].offsets.to_numpy().astype(np.int64) for c in COLUMNS}
    vals = {c: cols[c].values.to_numpy(zero_copy_only=False) for c in COLUMNS}
    n = table.num_rows
    res = ScanResult(packs=n)
    problems: list[str] = []
    r0 = 0
    while r0 < n:
        # rows [r0, r1) with about CHUNK_TOKENS tokens (at least one row)
        r1 = int(np.searchsorted(offs["input_ids"], offs["input_ids"][r0] + CHUNK_TOKENS,
                                 side="right")) - 1
        r1 = min(max(r1, r0 + 1), n)

        def block(c):
            o = offs[c][r0:r1 + 1]
            return o - o[0], vals[c][o[0]:o[-1]]

        off, ids = block("input_ids")
        lo, lab = block("labels")
        po, pos = block("position_ids")
        cu_off, cu = block("cu_seqlens")
        si_off, si = block("sample_index")
        bad = _bad_rows_block(off, ids, lab, pos, cu_off, cu, np.diff(si_off), [lo, po],
                              max_length, vocab)
        if len(ids):
            mn, mx = int(ids.min()), int(ids.max())
            res.min_token_id = mn if res.min_token_id is None else min(res.min_token_id, mn)
            res.max_token_id = mx if res.max_token_id is None else max(res.max_token_id, mx)
        res.tokens += len(ids)
        res.samples += len(si)
        res.label_tokens += int(np.count_nonzero(lab != IGNORE_INDEX))
        for b in bad:
            r = r0 + int(b)
            row = {c: vals[c][offs[c][r]:offs[c][r + 1]] for c in COLUMNS}
            rule = check_pack(row, max_length, vocab) or "invariant: pack breaks an invariant"
            problems.append(str(FormatError(rule, shard=name, row=r, rule=rule.split(":")[0])))
            if len(problems) >= max_problems:
                return problems, res
        r0 = r1
    return problems, res


def check_dataset(shards_dir: str | os.PathLike, manifest: dict,
                  full_checksums: bool = False) -> ScanResult:
    """Refuse a dataset whose shards break the manifest or any pack invariant. Shard files'
    sizes, schemas and row counts always (plus sha256 with `full_checksums`), every pack's
    invariants always. Raises FormatError naming the first problem and how many there are."""
    t0 = time.perf_counter()
    d = Path(shards_dir)
    problems = verify(d, checksums=full_checksums, invariants=False)
    total = ScanResult()
    if not problems:
        vocab = manifest["tokenizer"].get("vocab_size")
        max_length = int(manifest["max_length"])
        for info in manifest["shards"]:
            table = open_shard(d, info)
            p, r = scan_invariants(table, info["path"], max_length, vocab)
            problems += p
            if r.tokens != info["tokens"]:
                problems.append(str(FormatError(f"{r.tokens} tokens, manifest says "
                                                f"{info['tokens']}", shard=info["path"],
                                                rule="shard-tokens")))
            total.packs += r.packs
            total.tokens += r.tokens
            total.samples += r.samples
            total.label_tokens += r.label_tokens
            for attr, fn in (("min_token_id", min), ("max_token_id", max)):
                v, w = getattr(total, attr), getattr(r, attr)
                setattr(total, attr, w if v is None else (v if w is None else fn(v, w)))
            if problems:
                break
    if not problems:
        stats = manifest["stats"]
        for key, got in (("tokens", total.tokens), ("samples_packed", total.samples),
                         ("label_tokens", total.label_tokens)):
            if key in stats and int(stats[key]) != got:
                problems.append(str(FormatError(
                    f"shards hold {got} {key.replace('_', ' ')}, stats.{key} says {stats[key]}; "
                    f"the manifest was edited — rebuild the dataset", shard="manifest.json",
                    rule=f"stats-{key.replace('_', '-')}")))
    if problems:
        more = f" (+{len(problems) - 1} more; run pack-verify {d} to list them)" \
            if len(problems) > 1 else ""
        raise FormatError(f"dataset {d} refused: {problems[0]}{more}")
    total.seconds = time.perf_counter() - t0
    return total


# ---------------------------------------------------------------- all together

def preflight(shards_dir: str | os.PathLike, manifest: dict, model,
              model_path: str | os.PathLike, full_checksums: bool = False,
              allow_tokenizer_mismatch: bool = False) -> list[str]:
    """All checks above, cheapest first; raises on the first refusal, returns warnings.

    shards_dir      the packed dataset directory (its manifest already read by read_manifest)
    manifest        that manifest
    model           the model about to train (HF or peft-wrapped; partitioned under ZeRO-3 is fine)
    model_path      the --model directory whose tokenizer must match the dataset's
    full_checksums  also sha256 every shard (train-run --verify); sizes/schemas/rows and pack
                    invariants are always checked
    allow_tokenizer_mismatch  downgrade tokenizer differences to warnings (token ids must still fit)
    """
    warnings = check_tokenizer(shards_dir, manifest, model_path, allow_tokenizer_mismatch)
    warnings += check_data(shards_dir, manifest, model, full_checksums, allow_tokenizer_mismatch)
    warnings += check_context_length(manifest, model)
    return warnings


def check_data(shards_dir: str | os.PathLike, manifest: dict, model, full_checksums: bool,
               allow_tokenizer_mismatch: bool = False) -> list[str]:
    """The dataset's own checks (also the eval set's, train.evaluate): token ids the model's
    embeddings hold, shard sizes/schemas/rows, sha256 (`full_checksums`), every pack invariant."""
    from pack.remote import scan_ready

    warnings = check_token_range(shards_dir, manifest, model, None, allow_tokenizer_mismatch)
    # A streamed URL's shards are checked as each arrives (pack/remote.py), not all up front.
    if scan_ready(shards_dir, fetch_all=full_checksums):
        scan = check_dataset(shards_dir, manifest, full_checksums)
        check_token_range(shards_dir, manifest, model, scan.max_token_id, True)
    return warnings


def check_same_tokenizer(label: str, manifest: dict, ref_label: str, ref: dict,
                         fix: str) -> None:
    """A dataset trained or evaluated beside another must carry its tokenizer fingerprint: the
    same token id would otherwise mean other text. `fix` ends the one-line refusal."""
    want, got = ref["tokenizer"].get("fingerprint"), manifest["tokenizer"].get("fingerprint")
    if got != want:
        raise PacktrainError(f"{label}: packed with another tokenizer (fingerprint {got}) than "
                             f"{ref_label} ({want}); {fix}")
