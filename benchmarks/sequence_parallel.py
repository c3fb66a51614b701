"""Sequence parallelism (train-run --sequence-parallel N): per-rank peak memory and exactness.

Claim: with N ranks sharing one packed row (Ulysses, train.sequence_parallel) each rank's peak
activation memory for a long pack is about 1/N of one rank holding the whole row, and the loss and
gradients are those of one rank.

What one configuration does: N processes (gloo on CPU, 1 torch thread each) build the same seeded
random-weight model from a config (--arch, --hidden, --layers, --heads, --kv-heads, --vocab) and one
packed row of --length tokens (samples of --sample-len tokens, every token a target except a -100
at each sample start; one shorter last sample when the length does not divide). Each rank then
runs forward + backward of packtrain's packed loss: N = 1 `train.loss.packed_loss` on the whole
row, N > 1 `train.sequence_parallel.slice_loss` on its piece (the same code train-run runs).

Memory, two ways, the largest rank reported:
- saved/rank: the bytes autograd saves for backward during the forward (each storage once,
  parameters left out): the activations, free of any allocator's behaviour;
- peak/rank: each rank's peak resident set (VmHWM, reset with /proc/self/clear_refs once the model
  and row are built) minus its resident set at that moment: what forward + backward added
  (activations, gradients, the loss's buffers, transients). Linux only. By default the ranks run
  with glibc's MALLOC_MMAP_THRESHOLD_=131072, so freed large buffers go back to the system: with
  glibc's default adaptive threshold, freed all-to-all and backward transients stay in the heap
  and count as resident (at 32k N = 2 that is ~0.5 GiB more; `--glibc-default` measures that way).

Exactness: the ranks'
gradients are summed (an all-reduce, after the memory is read) and compared with N = 1: relative
error of the summed loss and the largest relative error (norm of difference / norm) over all
parameters.

    python benchmarks/sequence_parallel.py [--length 32768] [--sizes 1,2]

Outputs: a table on stdout and benchmarks/results/sequence_parallel.json (--out to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import RESULTS, cpu_name, environment, proc_status, table


def packed_row(length: int, sample_len: int, vocab: int):
    """A MicroBatch of one row: samples of sample_len (the last shorter), seeded tokens."""
    import torch

    from train.data import MicroBatch

    lengths = [sample_len] * (length // sample_len) + ([length % sample_len] if length % sample_len else [])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (1, length), generator=g)
    labels = ids.clone()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels[0, cu[:-1].long()] = -100
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return MicroBatch(ids, labels, pos, cu, max(lengths), [0])


@contextlib.contextmanager
def saved_activations(skip: set[int]):
    """Bytes autograd saves for backward during the block, by storage (counted once however many
    views of it are saved; parameters left out): the activation memory, free of allocator noise."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def rank_main(rank: int, n: int, port: int, a: argparse.Namespace, out_dir: str) -> None:
    import torch
    import torch.distributed as tdist

    from train.attention import enable_packed_attention
    from train.loss import packed_loss
    from train.sequence_parallel import SPGroup, enable_ulysses, slice_loss, slice_micro_batch
    from train.tiny import make_tiny_model

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    model = make_tiny_model(a.arch, None, vocab_size=a.vocab, hidden=a.hidden, layers=a.layers,
                            heads=a.heads, kv_heads=a.kv_heads, seed=0)
    model.train()
    enable_packed_attention(model, "sdpa")
    mb = packed_row(a.length, a.sample_len, a.vocab)
    sp = None
    if n > 1:
        sp = SPGroup(n, rank, 0, 1, tdist.new_group(list(range(n))))
        enable_ulysses(model, "packtrain_sdpa", sp)
        mb = slice_micro_batch(mb, sp)
    tdist.barrier()
    base = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with saved_activations(params) as saved:
        if sp is None:
            loss, count = packed_loss(model, mb.input_ids, mb.labels, mb.position_ids,
                                      mb.cu_seqlens, a.chunk, max_length=mb.max_seqlen)
        else:
            loss, count = slice_loss(model, mb, a.chunk)
    loss.backward()
    wall = time.perf_counter() - t0
    peak = proc_status("VmHWM")
    stats = torch.tensor([float(loss.detach()), float(count)], dtype=torch.float64)
    tdist.all_reduce(stats)
    grads = {k: p.grad for k, p in model.named_parameters()}
    for g in grads.values():
        tdist.all_reduce(g)
    mem = [None] * n
    tdist.all_gather_object(mem, {"extra_mb": (peak - base) / 2**20, "wall_s": wall,
                                   "saved_mb": sum(saved.values()) / 2**20})
    if rank == 0:
        torch.save({k: g.clone() for k, g in grads.items()}, Path(out_dir) / f"grads-{n}.pt")
        (Path(out_dir) / f"result-{n}.json").write_text(json.dumps(
            {"n": n, "loss_sum": float(stats[0]), "label_tokens": int(stats[1]), "ranks": mem}))
    tdist.destroy_process_group()


def run(n: int, a: argparse.Namespace, out_dir: str) -> dict:
    import torch.multiprocessing as mp

    from train.dist import free_port

    mp.start_processes(rank_main, args=(n, free_port(), a, out_dir), nprocs=n, start_method="spawn")
    return json.loads((Path(out_dir) / f"result-{n}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--sample-len", type=int, default=2048)
    ap.add_argument("--sizes", default="1,2", help="sequence-parallel sizes N (1 first: the reference)")
    ap.add_argument("--arch", default="llama", choices=("llama", "qwen3", "qwen2", "mistral"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's adaptive mmap threshold (freed buffers stay resident)")
    ap.add_argument("--out", default=str(RESULTS / "sequence_parallel.json"))
    a = ap.parse_args(argv)
    if not a.glibc_default:  # read by glibc at each spawned rank's start
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("sequence_parallel: needs Linux /proc (VmHWM and clear_refs) to measure peak memory")
    import torch

    sizes = [int(x) for x in a.sizes.split(",")]
    if sizes[0] != 1:
        raise SystemExit("--sizes: start with 1 (the reference the others are compared with)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            r = run(n, a, tmp)
            grads = torch.load(Path(tmp) / f"grads-{n}.pt")
            ref = torch.load(Path(tmp) / "grads-1.pt")
            ref_loss = rows[0]["loss_sum"] if rows else r["loss_sum"]
            rows.append({"n": n, "length": a.length, "label_tokens": r["label_tokens"],
                         "loss_sum": r["loss_sum"],
                         "peak_extra_mb": max(x["extra_mb"] for x in r["ranks"]),
                         "saved_mb": max(x["saved_mb"] for x in r["ranks"]),
                         "wall_s": max(x["wall_s"] for x in r["ranks"]),
                         "loss_rel_err": abs(r["loss_sum"] - ref_loss) / abs(ref_loss),
                         "grad_rel_err": max(float((grads[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
                                             for k in ref)})
    for r in rows:
        r["memory_vs_n1"] = r["peak_extra_mb"] / rows[0]["peak_extra_mb"]
        r["saved_vs_n1"] = r["saved_mb"] / rows[0]["saved_mb"]
    print(table(rows, [("n", "N", "d"), ("length", "tokens", "d"), ("label_tokens", "label tokens", "d"),
                       ("peak_extra_mb", "peak/rank MiB", ".0f"), ("memory_vs_n1", "vs N=1", ".2f"),
                       ("saved_mb", "saved/rank MiB", ".0f"), ("saved_vs_n1", "vs N=1", ".2f"),
                       ("wall_s", "fwd+bwd s", ".1f"), ("loss_rel_err", "loss rel err", ".1e"),
                       ("grad_rel_err", "grad rel err", ".1e")]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "cpu": cpu_name(), "environment": environment(),
                               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
