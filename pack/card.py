"""Human-readable views of a manifest: the dataset card (README.md next to the shards) and the
one-screen summary that ``pack-info`` prints. Both are derived from the manifest only."""

from __future__ import annotations

from typing import Any

from .eval_split import eval_note
from .sanity import check_lines


def fmt_bytes(n: int) -> str:
    """A byte count for people: ``1536`` -> ``"1.5 KB"`` (units of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items()) if d else "none"


def text_histogram(edges: list, counts: list, width: int = 40, label=None) -> list[str]:
    """One line per bin: ``[lo, hi)  count  ####``; bars scaled to the largest count."""
    top = max(counts) if counts else 0
    label = label or (lambda lo, hi: f"{lo:>6,}-{hi - 1:<6,}")
    lines = []
    for i, c in enumerate(counts):
        bar = "#" * (round(width * c / top) if top else 0)
        if c and not bar:
            bar = "."
        lines.append(f"  {label(edges[i], edges[i + 1])} {c:>9,}  {bar}")
    return lines


def _fill_label(lo: float, hi: float) -> str:
    return f"{100 * lo:>5.1f}-{100 * hi:<5.1f}%"


def partition_note(manifest: dict[str, Any]) -> str | None:
    """One line on a partition build or a merge of partitions; None for a whole build."""
    part, merged = manifest.get("partition"), manifest.get("merged")
    if part:
        return (f"partition {part['index']} of {part['count']} (blocks of "
                f"{part['block_records']} records, {part['rule']}); statistics cover this "
                f"partition, sources the whole build; join with pack-merge")
    if merged:
        return (f"merged from {merged['partitions']} partitions by pack-merge (blocks of "
                f"{merged['block_records']} records, {merged['rule']}); shards "
                f"{merged['shard_files']}")
    return None


def info_text(manifest: dict[str, Any]) -> str:
    """What a consumer needs on one screen."""
    s = manifest["stats"]
    tok = manifest["tokenizer"]
    tpl = manifest["template"]
    pk = manifest["packing"]
    shards = manifest["shards"]
    size = sum(sh["bytes"] for sh in shards)
    created = manifest.get("created_by", {})
    lines = [
        f"packed dataset   format {manifest['format_version']}, written by packtrain "
        f"{created.get('packtrain', '?')}",
        f"tokenizer        {tok.get('name') or tok['path']} (vocab {tok['vocab_size']:,})",
        f"  fingerprint    {tok['fingerprint']}",
        f"template         {tpl['name']} (records: {tpl['format']}; train on prompt: "
        f"{'yes' if tpl['train_on_prompt'] else 'no'})",
        f"max_length       {manifest['max_length']:,}",
        f"packing          {pk['strategy']}, seed {pk['seed']}, overlong: {pk['overlong']}",
        f"records          {s['records']:,} read, {s['samples_packed']:,} "
        f"{'segments ' if 'pairs' in s else ''}packed",
        f"  dropped        {_counts(s.get('dropped'))}",
        f"  skipped        {_counts(s.get('skipped_invalid'))}",
        f"  truncated      {s['truncated']:,} ({s.get('truncated_tokens', 0):,} tokens cut off)",
        f"tokens           {s['tokens']:,} ({s['label_tokens']:,} with labels, "
        f"{100 * s['label_tokens'] / max(1, s['tokens']):.1f}%)",
        f"packs            {s['packs']:,} (lower bound {s['lower_bound']:,}, "
        f"+{s['packs'] - s['lower_bound']:,}); fill {100 * s['fill']:.2f}%",
        f"shards           {len(shards)} ({fmt_bytes(size)})",
    ]
    if "pairs" in s:
        p = s["pairs"]
        lines.insert(7, f"pairs            {p['in']:,} read, {p['packed']:,} packed (2 segments "
                        f"each: chosen, rejected); dropped {_counts(p.get('dropped'))}")
    for ref in manifest.get("reference_logps") or ():
        lines.append(f"reference       {ref['model']} ({ref['dtype']}, fingerprint "
                     f"{ref['fingerprint'][:16]}): log-probs in {ref['dir']}/")
    if partition_note(manifest):
        lines.append(f"partitions       {partition_note(manifest)}")
    if eval_note(manifest):
        lines.append(f"eval split       {eval_note(manifest)}")
    srcs = manifest["sources"]
    lines.append(f"sources          {len(srcs)} file(s)")
    for src in srcs[:8]:
        lines.append(f"  {src['path']}  {src['records']:,} records, sha256 {src['sha256'][:12]}")
    if len(srcs) > 8:
        lines.append(f"  ... and {len(srcs) - 8} more")
    lines += check_lines(manifest.get("checks"))
    hist = s.get("length_histogram")
    if hist and hist.get("counts"):
        lines.append("pair lengths (tokens)" if "pairs" in s else "sample lengths (tokens)")
        lines += text_histogram(hist["edges"], hist["counts"], width=36)
    if "seconds" in s:
        lines.append(f"built in         {s['seconds']:.1f} s ({s.get('tokens_per_s', 0):,.0f} "
                     f"tokens/s)")
    return "\n".join(lines)


def dataset_card(manifest: dict[str, Any]) -> str:
    """README.md for the output directory: what is in it and how to use it."""
    s = manifest["stats"]
    tok = manifest["tokenizer"]
    tpl = manifest["template"]
    pk = manifest["packing"]
    shards = manifest["shards"]
    size = sum(sh["bytes"] for sh in shards)
    out = [
        "# Packed dataset",
        "",
        f"Written by packtrain {manifest['created_by'].get('packtrain', '?')} "
        f"(format `{manifest['format']}` {manifest['format_version']}). "
        "`manifest.json` is the authority; this card is a summary of it.",
        "",
        "| | |",
        "|---|---|",
        f"| tokenizer | `{tok.get('name') or tok['path']}` (vocab {tok['vocab_size']:,}) |",
        f"| fingerprint | `{tok['fingerprint']}` |",
        f"| template | {tpl['name']} (records: {tpl['format']}, train on prompt: "
        f"{'yes' if tpl['train_on_prompt'] else 'no'}) |",
        f"| max_length | {manifest['max_length']:,} |",
        f"| packing | {pk['strategy']}, seed {pk['seed']}, overlong samples: {pk['overlong']} |",
        f"| records | {s['records']:,} read, {s['samples_packed']:,} "
        f"{'segments ' if 'pairs' in s else ''}packed |",
        *([f"| pairs | {s['pairs']['packed']:,} packed, each two segments (chosen, then "
           f"rejected; columns `pair_id`, `role`) |"] if "pairs" in s else []),
        f"| dropped | {_counts(s.get('dropped'))} |",
        f"| skipped invalid | {_counts(s.get('skipped_invalid'))} |",
        f"| truncated | {s['truncated']:,} ({s.get('truncated_tokens', 0):,} tokens cut off) |",
        f"| tokens | {s['tokens']:,} ({s['label_tokens']:,} with labels) |",
        f"| packs | {s['packs']:,} (lower bound {s['lower_bound']:,}), fill "
        f"{100 * s['fill']:.2f}% |",
        f"| shards | {len(shards)} ({fmt_bytes(size)}) |",
        *([f"| partitions | {partition_note(manifest)} |"] if partition_note(manifest) else []),
        *([f"| eval split | {eval_note(manifest)} |"] if eval_note(manifest) else []),
        "",
        "## Sources",
        "",
    ]
    for src in manifest["sources"]:
        out.append(f"- `{src['path']}`: {src['records']:,} records, sha256 `{src['sha256']}`")
    checks = check_lines(manifest.get("checks"))
    if checks:
        out += ["", "## Checks", "", "```", *(c.strip() for c in checks[1:]), "```"]
    hist = s.get("length_histogram")
    if hist and hist.get("counts"):
        out += ["", "## Pair lengths (tokens)" if "pairs" in s else "## Sample lengths (tokens)",
                "", "```"]
        out += text_histogram(hist["edges"], hist["counts"], width=36)
        out.append("```")
    out += [
        "",
        "## Use",
        "",
        "```bash",
        "pack-verify .      # checksums and every pack's invariants",
        "pack-info .        # this summary, from the manifest",
        "train-run --shards . ...",
        "```",
        "",
        "Each row of a `shard-*.arrow` file (Arrow IPC, uncompressed) is one pack: `input_ids`, "
        "`labels` (-100 where no loss is taken, unshifted), `position_ids` (restart at every "
        "sample), `cu_seqlens`, `sample_index` (the source record of each sample).",
        "",
    ]
    return "\n".join(out)
