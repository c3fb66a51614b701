"""benchmarks/gpu_check.py's "kernels" section: train-run's --kernels and --compile paths against the
reference (eager, packtrain's chunked loss) on one packed row, within bf16 noise.

Rows (each: loss and gradient relative L2 errors, the tolerance, pass/fail):

  liger model        Llama and Qwen3 (bf16): the model patched by train.kernels.apply_kernels
                     (liger-kernel's RMSNorm, RoPE, SwiGLU) vs the same weights unpatched; both
                     through train.loss.packed_loss with packtrain_sdpa. liger's RoPE replaces the
                     modeling module's apply_rotary_pos_emb for the process: restored afterwards.
  liger flce         train.loss.chunked_cross_entropy with kernel='liger' (liger-kernel's fused
                     linear cross-entropy, reduction sum over the selected label tokens) vs
                     kernel='chunked', both against fp32 full logits: loss, d/dhidden, d/dweight;
                     labels with -100 at sample starts and prompt spans, so ignored tokens are
                     exercised.
  compile            Llama and Qwen3 (bf16), the backend --attn auto picks here (flash, else torch
                     varlen, else sdpa): compiled decoder layers (train.compile) vs eager; the
                     number of graphs compiled over three packs of other lengths is reported (1
                     expected), and the boundary reads from the device in a step whose boundaries
                     the host gave (0 expected). --quick: Llama only.

Tolerance (bf16 rows): 2 x the noise floor (the same eager computation in bf16 vs fp32) + 1e-3,
as the correctness section. The liger rows are skipped (with the reason) where liger-kernel does
not import or there is no CUDA; on CPU (--cpu-smoke) only the compile rows run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import traceback

import torch
import torch.nn.functional as F

from train.kernels import apply_kernels, liger_available
from train.loss import chunked_cross_entropy, packed_loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def _row_tensors(lengths: list[int], vocab: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids.to(device), labels.to(device), pos.to(device), cu.to(device)


def _loss_grads(model, row, chunk: int = 256, bounds: list[int] | None = None):
    ids, labels, pos, cu = row
    model.zero_grad(set_to_none=True)
    loss, _ = packed_loss(model, ids, labels, pos, cu, chunk_size=chunk, bounds=bounds)
    loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters()
                       if p.grad is not None])
    return loss.detach().float(), grads


@contextlib.contextmanager
def _module_restored(model):
    """Put back the transformers modeling module's globals (liger replaces some of them)."""
    mod = importlib.import_module(type(model).__module__)
    saved = dict(vars(mod))
    try:
        yield
    finally:
        for k in list(vars(mod)):
            if k not in saved:
                delattr(mod, k)
        for k, v in saved.items():
            setattr(mod, k, v)


def _verdict(row: dict, errs: dict, noise: dict) -> dict:
    tol = {k: 2 * noise.get(k, 0.0) + 1e-3 for k in errs}
    row.update(relerr=errs, noise_floor=noise, tolerance=tol,
               **{"pass": all(errs[k] <= tol[k] for k in errs)})
    return row


def _noise(base, row) -> dict:
    """bf16 eager vs fp32 eager: the precision's own error on this row."""
    l32, g32 = _loss_grads(base, row)
    l16, g16 = _loss_grads(copy.deepcopy(base).to(torch.bfloat16), row)
    return {"loss": _rel(l16, l32), "grads": _rel(g16, g32)}


def model_rows(args, device, small_model, backends, log, time_left) -> list[dict]:
    from train.attention import enable_packed_attention
    from train.compile import compile_decoder_layers
    from torch._dynamo.utils import counters

    rows = []
    lengths = [13, 40, 1, 22, 7] if args.cpu_smoke else [37, 128, 300, 5, 211, 1, 64, 190]
    liger_ok, liger_why = liger_available(device)
    for arch in ("llama",) if args.quick else ("llama", "qwen3"):
        if time_left() < args.min_section_s:
            rows.append({"arch": arch, "check": "all",
                         "skipped": f"time budget ({time_left():.0f}s left)"})
            log(f"  {arch:6s} skipped: {rows[-1]['skipped']}")
            continue
        torch.manual_seed(0)
        base = small_model(arch, args.cpu_smoke).to(device).float().train()
        enable_packed_attention(base, "packtrain_sdpa")
        row_t = _row_tensors(lengths, base.config.vocab_size, device, 0)
        noise = _noise(base, row_t)
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        ref = _loss_grads(bf16, row_t)
        cases = [("liger model", "packtrain_sdpa"), ("compile", backends[-1])]
        for kind, backend in cases:
            row = {"arch": arch, "dtype": "bfloat16", "check": kind, "backend": backend}
            try:
                if kind == "liger model" and not liger_ok:
                    row.update(skipped=liger_why)
                    log(f"  {arch:6s} {kind:12s} skipped: {liger_why}")
                    rows.append(row)
                    continue
                model = copy.deepcopy(bf16)
                enable_packed_attention(model, backend)
                ref_b = ref if backend == "packtrain_sdpa" else _loss_grads(copy.deepcopy(model), row_t)
                with _module_restored(model):
                    if kind == "liger model":
                        row["patched"] = apply_kernels(model, "liger")
                    else:
                        compile_decoder_layers(model, backend)
                        torch._dynamo.reset()
                        counters.clear()
                    loss, grads = _loss_grads(model, row_t)
                    if kind == "compile":
                        row["boundary_reads"] = _boundary_reads(model, row_t)
                        for seed, other in enumerate(([50, 3, 11], [100], [31, 31, 5]), 1):
                            _loss_grads(model, _row_tensors(other, base.config.vocab_size, device, seed))
                        row["graphs_compiled"] = counters["stats"]["unique_graphs"]
                        row["graph_breaks"] = sum(counters["graph_break"].values())
                _verdict(row, {"loss": _rel(loss, ref_b[0]), "grads": _rel(grads, ref_b[1])}, noise)
                extra = f" graphs {row['graphs_compiled']}, boundary reads " \
                    f"{row['boundary_reads']}" if kind == "compile" else ""
                log(f"  {arch:6s} {kind:12s} {backend:16s} loss {row['relerr']['loss']:.2e} grads "
                    f"{row['relerr']['grads']:.2e} (tol {row['tolerance']['grads']:.1e}){extra}  "
                    f"{'PASS' if row['pass'] else 'FAIL'}")
            except Exception as e:  # noqa: BLE001 - one row's failure keeps the others
                row.update(error=f"{type(e).__name__}: {e}"[:300], **{"pass": False})
                log(f"  {arch:6s} {kind:12s} {backend:16s} ERROR {row['error']}")
                traceback.print_exc()
            rows.append(row)
    return rows


def _boundary_reads(model, row) -> int:
    """Reads of the sample boundaries back from the device in one compiled step whose boundaries
    the host gave (train-run's case): 0 expected (each would be a sync per layer on CUDA)."""
    import train.attention as A

    reads, convert = [], A._Boundaries._convert
    A._Boundaries._convert = staticmethod(lambda *a: reads.append(1) or convert(*a))
    try:
        _loss_grads(model, row, bounds=[int(x) for x in row[3].tolist()])
    finally:
        A._Boundaries._convert = staticmethod(convert)
    return len(reads)


def flce_row(args, device, log) -> dict:
    """liger's fused linear CE vs the chunked CE, both against fp32 full logits."""
    row = {"check": "liger flce", "dtype": "bfloat16"}
    ok, why = liger_available(device)
    if not ok:
        log(f"  liger flce skipped: {why}")
        return {**row, "skipped": why}
    hdim, vocab = (64, 1000) if args.cpu_smoke else (896, 151936)
    lengths = [300, 5, 211, 1, 64, 190, 900, 377]
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    h = torch.randn(total, hdim, generator=g).to(device, torch.bfloat16)
    w = (0.02 * torch.randn(vocab, hdim, generator=g)).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (total,), generator=g)
    labels[torch.rand(total, generator=g) < 0.3] = -100  # prompt tokens: ignored
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels[cu[:-1].long()] = -100
    labels, cu = labels.to(device), cu.to(device)
    try:
        out = {}
        for name in ("reference", "chunked", "liger"):
            hh = (h.float() if name == "reference" else h).clone().requires_grad_()
            ww = (w.float() if name == "reference" else w).clone().requires_grad_()
            if name == "reference":
                from train.loss import shift_labels

                t = shift_labels(labels, cu)
                loss = F.cross_entropy(F.linear(hh, ww), t, ignore_index=-100, reduction="sum")
                n = int((t != -100).sum())
            else:
                loss, n = chunked_cross_entropy(hh, ww, labels, 1024, cu_seqlens=cu, kernel=name)
            loss.backward()
            out[name] = (loss.detach().float(), hh.grad.float(), ww.grad.float(), n)
        ref = out["reference"]
        errs = {f"{k}_{name}": _rel(v, r) for name in ("chunked", "liger")
                for k, v, r in zip(("loss", "grad_h", "grad_w"), out[name][:3], ref[:3])}
        noise = {k: errs[f"{k}_chunked"] for k in ("loss", "grad_h", "grad_w")}
        _verdict(row, {k: errs[f"{k}_liger"] for k in noise}, noise)
        row.update(errors=errs, label_tokens={k: v[3] for k, v in out.items()})
        row["pass"] = row["pass"] and len(set(row["label_tokens"].values())) == 1
        log(f"  liger flce vs fp32: loss {errs['loss_liger']:.2e} grad_h {errs['grad_h_liger']:.2e} "
            f"grad_w {errs['grad_w_liger']:.2e}; chunked: {errs['loss_chunked']:.2e} "
            f"{errs['grad_h_chunked']:.2e} {errs['grad_w_chunked']:.2e}  "
            f"{'PASS' if row['pass'] else 'FAIL'}")
    except Exception as e:  # noqa: BLE001
        row.update(error=f"{type(e).__name__}: {e}"[:300], **{"pass": False})
        log(f"  liger flce ERROR {row['error']}")
        traceback.print_exc()
    return row


def section_kernels(args, device, small_model, backends, log, time_left) -> dict:
    """The section's rows; all_pass is False when a row that ran failed (skips do not count).
    `backends`: the available packtrain backends, best last; `time_left()`: seconds of budget."""
    rows = model_rows(args, device, small_model, backends, log, time_left)
    if time_left() >= args.min_section_s:
        rows.append(flce_row(args, device, log))
    else:
        rows.append({"check": "liger flce", "skipped": f"time budget ({time_left():.0f}s left)"})
    ran = [r for r in rows if "skipped" not in r]
    return {"rows": rows, "all_pass": all(r.get("pass") for r in ran)}
