#!/usr/bin/env python
"""GPU check for packtrain's packed attention and chunked loss (run it with benchmarks/gpu_check.sh).

Sections (each in its own try/except, so one failure does not lose the rest; JSON is rewritten
after every measurement, so a timeout keeps what was done):

1. env          torch / transformers / CUDA / GPU, which varlen backends are usable.
2. correctness  for Llama and Qwen3 tiny-ish configs in bf16 and fp32: every available backend
                (packtrain_sdpa, packtrain_torch, packtrain_flash) on one packed row versus the
                samples run one by one with transformers' sdpa: logits, and gradients of the summed
                CE (through train.loss.packed_loss). Relative errors (L2) with pass/fail. Exact paths
                (fp32 packtrain_sdpa) must agree to 1e-5; half-precision paths must stay within
                2 x the noise floor (same-precision per-sample run vs fp32) + 1e-3. The CUDA kernels
                run fp32 models under bf16 autocast. Controls: transformers' sdpa on the packed row
                with position_ids (should pass) and without them (samples see each other: should fail).
2a. kernels    train-run --kernels liger / liger-flce and --compile against the reference paths,
                within bf16 noise (benchmarks/gpu_check_kernels.py says how).
2b. loss       CE forward+backward from hidden states (hidden 896, vocab 151936, bf16) at 4k/16k
                tokens: full fp32 logits (as HF models) vs chunked_cross_entropy; time and peak memory.
3. throughput   training steps (forward + backward + AdamW, bf16 weights, chunked CE) of a ~0.5B
                Qwen2.5-0.5B-like model (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate
                4864, vocab 151936, tied, random weights): unpacked (one sample per step, batch 1,
                transformers' sdpa), packed at 2k..32k with each varlen backend, and packed with
                dense SDPA + block-diagonal mask (transformers' sdpa, mask from position_ids) at 2k/4k.
                Sample lengths: lognormal, median 250 tokens, capped at 2048 (Alpaca-like); packs
                filled best-fit-decreasing. Reports median step time, tokens/s, MFU and peak memory.

MFU = (6 * N * tokens + attention flops) / step time / peak, N = parameters used in matmuls
(decoder linears + the lm_head, counted once even though tied), attention flops (causal, useful
only) = 6 * layers * heads * head_dim * sum(L_i^2) per step. Peak: 989 TFLOP/s (H100/H200 SXM
dense bf16), stated in the output; change with --peak-tflops.

  python benchmarks/gpu_check.py [--quick] [--cpu-smoke] [--sizes 2048,4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "benchmarks"):  # the repository, and gpu_check_kernels beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from train.attention import (  # noqa: E402
    enable_packed_attention,
    flash_attn_available,
    packed_forward_kwargs,
    torch_varlen_available,
)
from train.loss import chunked_cross_entropy, packed_loss, wgrad_accumulation_mode  # noqa: E402

T0 = time.monotonic()
RESULTS: dict = {"sections": {}}
OUT_PATH: Path | None = None


def log(msg: str = "") -> None:
    print(msg, flush=True)


def elapsed() -> float:
    return time.monotonic() - T0


def save() -> None:
    if OUT_PATH is None:
        return
    try:
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT_PATH.with_name(OUT_PATH.name + ".tmp")
        tmp.write_text(json.dumps(RESULTS, indent=2, default=str))
        os.replace(tmp, OUT_PATH)
    except Exception as e:  # never let reporting kill the run
        log(f"[warn] could not write {OUT_PATH}: {e}")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_attn(model, name: str) -> None:
    """Switch to a transformers implementation ('sdpa') or a packtrain backend."""
    if name.startswith("packtrain_"):
        enable_packed_attention(model, name)
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# 1. environment
# ------------------------------------------------------------------------------------------------


def section_env(device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    from importlib import metadata

    for dist in ("peft", "deepspeed", "flash-attn", "pyarrow"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1))
    env["chunked_ce_wgrad"] = wgrad_accumulation_mode(device)
    env["torch_varlen"] = torch_varlen_available(device)
    env["flash_attn_usable"] = flash_attn_available(device)
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        env["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except Exception as e:
        env["varlen_attn_signature"] = f"n/a ({type(e).__name__})"
    for k, v in env.items():
        log(f"  {k:22s} {v}")
    return env


def available_backends(device) -> tuple[list[str], dict]:
    names, skipped = ["packtrain_sdpa"], {}
    ok, why = torch_varlen_available(device)
    (names.append("packtrain_torch") if ok else skipped.__setitem__("packtrain_torch", why))
    ok, why = flash_attn_available(device)
    (names.append("packtrain_flash") if ok else skipped.__setitem__("packtrain_flash", why))
    for name, why in skipped.items():
        log(f"  [skip] {name}: {why}")
    return names, skipped


# ------------------------------------------------------------------------------------------------
# 2. correctness
# ------------------------------------------------------------------------------------------------


def small_model(arch: str, smoke: bool):
    if smoke:
        common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    else:
        common = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096)
    common["attention_dropout"] = 0.0
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=common["hidden_size"] // common["num_attention_heads"], **common))
    if arch == "mistral-window":  # sliding window shorter than some samples: checks window semantics
        return MistralForCausalLM(MistralConfig(sliding_window=16 if smoke else 64, **common))
    raise ValueError(arch)


def per_sample_reference(model, ids, labels, cu, autocast_dtype=None):
    """Each sample alone through transformers' own attention: concatenated logits, summed CE, grads."""
    model.zero_grad(set_to_none=True)
    dev = ids.device
    outs, loss = [], 0.0
    with torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            logits = model(input_ids=ids[None, s:e], use_cache=False).logits[0]
            outs.append(logits.detach().float())
            loss = loss + F.cross_entropy(logits[:-1].float(), labels[s + 1:e], ignore_index=-100, reduction="sum")
    loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    return torch.cat(outs), loss.detach().float(), grads


def packed_run(model, ids, labels, pos, cu, autocast_dtype=None, use_kwargs=True):
    model.zero_grad(set_to_none=True)
    dev = ids.device
    with torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        kw = packed_forward_kwargs(cu, pos)
        if not use_kwargs:  # transformers' sdpa: the block mask comes from position_ids alone
            kw = {k: kw[k] for k in ("position_ids", "use_cache", "attention_mask")}
        with torch.no_grad():
            logits = model(input_ids=ids[None], **kw).logits[0].float()
        loss, _ = packed_loss(model, ids, labels, pos, cu, chunk_size=256)
    loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    return logits, loss.detach().float(), grads


def section_correctness(args, device, backends) -> dict:
    out = {"rows": []}
    archs = ["llama"] if args.quick else ["llama", "qwen3", "mistral-window"]
    dtypes = [torch.bfloat16, torch.float32]
    lengths = [37, 128, 300, 5, 211, 1, 64, 190] if not args.cpu_smoke else [13, 40, 1, 22, 7]
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    log(f"  packed row: {len(lengths)} samples, T={total}, lengths={lengths}")
    for arch in archs:
        torch.manual_seed(0)
        base = small_model(arch, args.cpu_smoke).to(device).float().eval()
        vocab = base.config.vocab_size
        ids = torch.randint(0, vocab, (total,), generator=g).to(device)
        labels = ids.clone()
        labels[cu[:-1].long()] = -100
        ref_logits, ref_loss, ref_grads = per_sample_reference(base, ids, labels, cu)
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            model_dt = copy.deepcopy(base).to(dtype)
            # noise floor: the same per-sample computation at this precision vs fp32
            try:
                if dtype == torch.float32:
                    noise_exact = (0.0, 0.0)
                    ac_logits, _, ac_grads = per_sample_reference(model_dt, ids, labels, cu, torch.bfloat16)
                    noise_autocast = (relerr(ac_logits, ref_logits), relerr(ac_grads, ref_grads))
                else:
                    lo, _, gr = per_sample_reference(model_dt, ids, labels, cu)
                    noise_exact = noise_autocast = (relerr(lo, ref_logits), relerr(gr, ref_grads))
            except Exception as e:
                log(f"  [warn] noise-floor reference failed ({type(e).__name__}: {e}); using 1e-2")
                noise_exact = (0.0, 0.0) if dtype == torch.float32 else (1e-2, 1e-2)
                noise_autocast = (1e-2, 1e-2)
            cases = [(b, True) for b in backends] + [("sdpa(position_ids) control", False), ("sdpa(no packing) control", None)]
            for name, kind in cases:
                if arch == "mistral-window" and kind is not True and kind is not False:
                    continue  # the no-packing control is shown for the other archs
                row = {"arch": arch, "dtype": dname, "backend": name}
                try:
                    model = copy.deepcopy(model_dt)
                    autocast = None
                    if kind is True:
                        set_attn(model, name)
                        if dtype == torch.float32 and name != "packtrain_sdpa":
                            autocast = torch.bfloat16  # CUDA kernels are half precision only
                    if kind is None:  # no position_ids: one long causal sequence, samples see each other
                        model.zero_grad(set_to_none=True)
                        with torch.no_grad():
                            logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
                        loss, grads = None, None
                    else:
                        logits, loss, grads = packed_run(model, ids, labels, pos, cu, autocast, use_kwargs=kind)
                    noise = noise_autocast if autocast is not None else noise_exact
                    exact = dtype == torch.float32 and autocast is None
                    row["autocast"] = str(autocast).replace("torch.", "") if autocast else None
                    row["logits_relerr"] = relerr(logits, ref_logits)
                    row["loss_relerr"] = None if loss is None else relerr(loss, ref_loss)
                    row["grads_relerr"] = None if grads is None else relerr(grads, ref_grads)
                    row["noise_floor"] = {"logits": noise[0], "grads": noise[1]}
                    tol_l = 1e-5 if exact else 2 * noise[0] + 1e-3
                    tol_g = 1e-4 if exact else 2 * noise[1] + 1e-3
                    row["tolerance"] = {"logits": tol_l, "grads": tol_g}
                    ok = row["logits_relerr"] <= tol_l and (row["grads_relerr"] is None or row["grads_relerr"] <= tol_g)
                    row["pass"] = ok
                    row["expected_pass"] = kind is not None
                    verdict = "PASS" if ok else "FAIL"
                    if kind is None:
                        verdict = ("FAIL (expected: control)" if not ok else "PASS (UNEXPECTED: check has no teeth)")
                    g_txt = "-" if row["grads_relerr"] is None else f"{row['grads_relerr']:.2e}"
                    log(f"  {arch:14s} {dname:8s} {name:28s} logits {row['logits_relerr']:.2e} grads {g_txt:>9s}  "
                        f"(tol {tol_l:.1e}/{tol_g:.1e}{', autocast bf16' if autocast else ''})  {verdict}")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    row["pass"] = False
                    row["expected_pass"] = kind is not None
                    log(f"  {arch:14s} {dname:8s} {name:28s} ERROR {row['error']}")
                    traceback.print_exc()
                out["rows"].append(row)
                RESULTS["sections"]["correctness"] = out
                save()
            del model_dt
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r in out["rows"] if r["pass"] != r["expected_pass"]]
    out["all_as_expected"] = not bad
    log(f"  correctness: {len(out['rows']) - len(bad)}/{len(out['rows'])} rows as expected")
    return out


# ------------------------------------------------------------------------------------------------
# 2b. loss memory: chunked CE vs full logits
# ------------------------------------------------------------------------------------------------


def section_loss(args, device) -> dict:
    """Peak extra memory and time of CE forward+backward from hidden states: full logits
    (F.linear + F.cross_entropy on fp32 logits, as HF models do) vs chunked_cross_entropy."""
    out = {"rows": []}
    hdim, vocab = (64, 1000) if args.cpu_smoke else (896, 151936)
    sizes = [256, 1024] if args.cpu_smoke else args.loss_sizes
    dtype = torch.bfloat16
    log(f"  hidden {hdim}, vocab {vocab}, bf16 leaves, chunk {args.chunk}")
    for size in sizes:
        for mode in ("full logits", "chunked"):
            row = {"T": size, "mode": mode}
            try:
                g = torch.Generator().manual_seed(0)
                h = torch.randn(size, hdim, generator=g).to(device, dtype).requires_grad_()
                w = (0.02 * torch.randn(vocab, hdim, generator=g)).to(device, dtype).requires_grad_()
                labels = torch.randint(0, vocab, (size,), generator=g).to(device)
                times = []
                for r in range(4):
                    h.grad = w.grad = None
                    sync(device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    t = time.perf_counter()
                    if mode == "chunked":
                        loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=args.chunk)
                    else:
                        logits = F.linear(h, w).float()
                        loss = F.cross_entropy(logits[:-1], labels[1:], reduction="sum")
                        del logits
                    loss.backward()
                    sync(device)
                    if r:
                        times.append(time.perf_counter() - t)
                row["median_ms"] = 1000 * statistics.median(times)
                if device.type == "cuda":
                    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                mem = f"{row['peak_extra_gib']:.2f} GiB" if "peak_extra_gib" in row else "-"
                log(f"  T={size:6d} {mode:12s} {row['median_ms']:8.1f} ms  peak extra {mem}")
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
                log(f"  T={size:6d} {mode:12s} OOM")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  T={size:6d} {mode:12s} ERROR {row['error']}")
            finally:
                h = w = labels = loss = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            out["rows"].append(row)
            RESULTS["sections"]["loss"] = out
            save()
    return out


# ------------------------------------------------------------------------------------------------
# 3. throughput
# ------------------------------------------------------------------------------------------------


def bench_model_config(smoke: bool):
    if smoke:
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       tie_word_embeddings=True)


def sample_lengths(n: int, seed: int, median: int, sigma: float, cap: int, floor: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return np.clip(np.round(x), floor, cap).astype(np.int64)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            continue
        best, best_free = -1, capacity + 1
        for b, f in enumerate(free):
            if n <= f < best_free:
                best, best_free = b, f
                if f == n:
                    break
        if best < 0:
            bins.append([int(i)])
            free.append(capacity - n)
        else:
            bins[best].append(int(i))
            free[best] -= n
    return bins


def make_packs(capacity: int, count: int, args, seed: int) -> list[list[int]]:
    """`count` packs of lengths (the fullest of a best-fit-decreasing packing of a random pool)."""
    pool_tokens = capacity * (count + 2) * 1.3
    n = max(8, int(pool_tokens / (args.median_len * 1.4)))
    lengths = sample_lengths(n, seed, args.median_len, args.sigma, min(args.max_len, capacity))
    bins = best_fit_decreasing(lengths, capacity)
    bins.sort(key=lambda b: -sum(int(lengths[i]) for i in b))
    return [[int(lengths[i]) for i in b] for b in bins[:count]]


def matmul_params(model) -> int:
    n = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed_tokens" not in name:
            n += p.numel()
    head = model.get_output_embeddings().weight
    if head is model.get_input_embeddings().weight:
        n += head.numel()
    return n


def step_flops(cfg, n_matmul: int, lengths: list[int]) -> float:
    tokens = sum(lengths)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 6.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * sum(n * n for n in lengths)
    return 6.0 * n_matmul * tokens + attn


def build_row(lengths: list[int], device, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, vocab, (total,), generator=g)
    labels = ids.clone()
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    labels[cu[:-1].long()] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids.to(device), labels.to(device), pos.to(device), cu.to(device)


def run_steps(model, opt, rows, warmup: int, device, chunk: int):
    """rows: list of (lengths, tensors). Returns per-step (seconds, tokens) for the timed steps."""
    times, tokens = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, (lengths, (ids, labels, pos, cu)) in enumerate(rows):
        sync(device)
        t = time.perf_counter()
        loss, n = packed_loss(model, ids, labels, pos, cu, chunk_size=chunk, max_length=max(lengths))
        (loss / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt)
            tokens.append(sum(lengths))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss {loss.item()}")
    return times, tokens


def section_throughput(args, device, backends) -> dict:
    out = {"rows": []}
    cfg = bench_model_config(args.cpu_smoke)
    if args.peak_tflops is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if "H100" in name and "PCIe" in name:
            args.peak_tflops, note = 756.0, f"{name}: H100 PCIe dense bf16 peak"
        else:
            args.peak_tflops = 989.0
            note = f"{name}: H100/H200 SXM dense bf16 peak" + ("" if ("H100" in name or "H200" in name) else " (assumed)")
    else:
        note = "given with --peak-tflops"
    peak = args.peak_tflops * 1e12
    out["peak_tflops"] = args.peak_tflops
    out["peak_note"] = note
    dtype = torch.bfloat16
    t = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
    model = model.to(dtype).train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_params(model)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused) if fused else torch.optim.AdamW(model.parameters(), lr=1e-5)
    out["model"] = {"params": n_params, "matmul_params": n_matmul, "dtype": "bfloat16", "grad_ckpt": args.grad_ckpt,
                    "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "intermediate_size", "vocab_size")}}
    out["data"] = {"distribution": f"lognormal median {args.median_len} sigma {args.sigma}, capped {args.max_len}",
                   "packing": "best-fit-decreasing, fullest packs", "chunk_size": args.chunk}
    log(f"  model: {n_params / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in matmuls), built in "
        f"{time.perf_counter() - t:.1f}s; peak used for MFU: {args.peak_tflops:g} TFLOP/s ({note})")

    plans = []
    plans.append(("unpacked", "sdpa", None))
    for b in backends:
        for size in args.sizes:
            plans.append((f"packed {b}", b, size))
    for size in args.dense_sizes:
        plans.append(("packed dense-sdpa+mask", "sdpa", size))

    for label, attn, size in plans:
        row = {"mode": label, "attn": attn, "pack_size": size}
        remaining = args.budget_s - elapsed()
        if remaining < args.min_section_s:
            row["skipped"] = f"time budget ({remaining:.0f}s left)"
            log(f"  {label:28s} {str(size):>6s}  skipped: {row['skipped']}")
            out["rows"].append(row)
            continue
        try:
            set_attn(model, attn)
            if size is None:  # unpacked: one sample per step, batch 1
                lengths = sample_lengths(args.unpacked_warmup + args.unpacked_steps, 7, args.median_len, args.sigma,
                                         args.max_len)
                packs = [[int(n)] for n in lengths]
                warmup = args.unpacked_warmup
            else:
                packs = make_packs(size, args.warmup + args.steps, args, seed=size)
                warmup = args.warmup
            rows = [(p, build_row(p, device, cfg.vocab_size, seed=i)) for i, p in enumerate(packs)]
            times, tokens = run_steps(model, opt, rows, warmup, device, args.chunk)
            timed = [p for p in packs[warmup:]]
            flops = [step_flops(cfg, n_matmul, p) for p in timed]
            per_step_tps = [tk / dt for tk, dt in zip(tokens, times)]
            row.update(
                steps=len(times),
                median_step_ms=1000 * statistics.median(times),
                tokens_per_step=statistics.mean(tokens),
                samples_per_step=statistics.mean(len(p) for p in timed),
                fill=(statistics.mean(tokens) / size) if size else None,
                tokens_per_s=statistics.median(per_step_tps),
                tokens_per_s_total=sum(tokens) / sum(times),
                mfu=statistics.median(f / dt / peak for f, dt in zip(flops, times)),
                mfu_total=sum(flops) / sum(times) / peak,
                peak_mem_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
            )
            mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "-"
            log(f"  {label:28s} {str(size or '-'):>6s}  {row['median_step_ms']:8.1f} ms/step  {row['tokens_per_s']:10.0f} tok/s  "
                f"MFU {100 * row['mfu']:5.1f}%  mem {mem}  ({row['samples_per_step']:.1f} samples/step)")
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"OOM: {str(e).splitlines()[0]}"
            log(f"  {label:28s} {str(size):>6s}  OOM")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"  {label:28s} {str(size):>6s}  ERROR {row['error']}")
            traceback.print_exc()
        finally:
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out["rows"].append(row)
        RESULTS["sections"]["throughput"] = out
        save()
    base = next((r for r in out["rows"] if r["mode"] == "unpacked" and "tokens_per_s" in r), None)
    if base:
        for r in out["rows"]:
            if "tokens_per_s" in r:
                r["speedup_vs_unpacked"] = r["tokens_per_s"] / base["tokens_per_s"]
    del model, opt
    return out


# ------------------------------------------------------------------------------------------------


def final_table() -> None:
    log("\n" + "=" * 100)
    log("SUMMARY")
    corr = RESULTS["sections"].get("correctness")
    if isinstance(corr, dict) and corr.get("rows"):
        log(f"{'arch':14s} {'dtype':9s} {'backend':28s} {'logits relerr':>14s} {'grads relerr':>13s}  result")
        for r in corr["rows"]:
            if "error" in r:
                log(f"{r['arch']:14s} {r['dtype']:9s} {r['backend']:28s} ERROR {r['error'][:60]}")
                continue
            g = "-" if r.get("grads_relerr") is None else f"{r['grads_relerr']:.2e}"
            ok = "as expected" if r["pass"] == r["expected_pass"] else "UNEXPECTED"
            log(f"{r['arch']:14s} {r['dtype']:9s} {r['backend']:28s} {r['logits_relerr']:14.2e} {g:>13s}  "
                f"{'pass' if r['pass'] else 'fail'} ({ok})")
    kern = RESULTS["sections"].get("kernels")
    if isinstance(kern, dict) and kern.get("rows"):
        log(f"\n{'kernels: check':18s} {'arch':6s} {'backend':16s} relative errors (tolerance)  result")
        for r in kern["rows"]:
            what = r.get("skipped") or r.get("error") or "  ".join(
                f"{k} {v:.1e} ({r['tolerance'][k]:.1e})" for k, v in r["relerr"].items())
            result = "skipped" if "skipped" in r else ("pass" if r.get("pass") else "FAIL")
            log(f"{r['check']:18s} {r.get('arch', '-'):6s} {r.get('backend', '-'):16s} {what[:90]}  {result}")
    lo = RESULTS["sections"].get("loss")
    if isinstance(lo, dict) and lo.get("rows"):
        log(f"\n{'loss: T':>9s} {'mode':12s} {'ms':>8s} {'peak extra GiB':>15s}")
        for r in lo["rows"]:
            if "median_ms" not in r:
                log(f"{r['T']:9d} {r['mode']:12s} {r.get('error')}")
                continue
            mem = f"{r['peak_extra_gib']:.2f}" if "peak_extra_gib" in r else "-"
            log(f"{r['T']:9d} {r['mode']:12s} {r['median_ms']:8.1f} {mem:>15s}")
    thr = RESULTS["sections"].get("throughput")
    if isinstance(thr, dict) and thr.get("rows"):
        log(f"\nthroughput, MFU against {thr.get('peak_tflops')} TFLOP/s bf16 dense peak ({thr.get('peak_note')})")
        log(f"{'mode':28s} {'pack':>6s} {'ms/step':>9s} {'tok/s':>10s} {'x unpacked':>10s} {'MFU':>6s} {'mem GiB':>8s} {'fill':>6s}")
        for r in thr["rows"]:
            size = str(r.get("pack_size") or "-")
            if "tokens_per_s" not in r:
                log(f"{r['mode']:28s} {size:>6s}  {r.get('error') or r.get('skipped')}")
                continue
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            fill = f"{r['fill']:.3f}" if r.get("fill") else "-"
            log(f"{r['mode']:28s} {size:>6s} {r['median_step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
                f"{r.get('speedup_vs_unpacked', float('nan')):10.2f} {100 * r['mfu']:5.1f}% {mem:>8s} {fill:>6s}")
    log(f"\ntotal wall time {elapsed():.0f}s; JSON: {OUT_PATH}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer models, sizes and steps (about 2 minutes on an H100)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU: runs the code paths, numbers mean nothing")
    p.add_argument("--sections", default="correctness,kernels,loss,throughput")
    p.add_argument("--loss-sizes", default="4096,16384", help="row sizes for the loss-memory section")
    p.add_argument("--sizes", default=None, help="pack sizes, e.g. 2048,4096,8192,16384,32768")
    p.add_argument("--dense-sizes", default=None, help="pack sizes for dense SDPA + block mask (default 2048,4096)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per packed config")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--unpacked-steps", type=int, default=None)
    p.add_argument("--unpacked-warmup", type=int, default=None)
    p.add_argument("--median-len", type=int, default=250)
    p.add_argument("--sigma", type=float, default=0.9, help="lognormal sigma of sample lengths")
    p.add_argument("--max-len", type=int, default=2048, help="cap on sample length")
    p.add_argument("--chunk", type=int, default=1024, help="chunked CE chunk size (label tokens)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the throughput model")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator (default 989 = H100/H200 SXM dense bf16; 756 on H100 PCIe)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    p.add_argument("--min-section-s", type=float, default=20.0, help="skip a measurement when less time than this is left")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json, else benchmarks/results/)")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        defaults = dict(sizes="256,512", dense_sizes="256", steps=2, warmup=1, unpacked_steps=3, unpacked_warmup=1)
        a.median_len, a.max_len = min(a.median_len, 40), min(a.max_len, 200)
    elif a.quick:
        defaults = dict(sizes="2048,8192,32768", dense_sizes="2048", steps=4, warmup=2, unpacked_steps=16,
                        unpacked_warmup=4)
    else:
        defaults = dict(sizes="2048,4096,8192,16384,32768", dense_sizes="2048,4096", steps=8, warmup=3,
                        unpacked_steps=40, unpacked_warmup=8)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sizes = [int(x) for x in str(a.sizes).split(",") if x]
    a.dense_sizes = [int(x) for x in str(a.dense_sizes).split(",") if x]
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    a.loss_sizes = [int(x) for x in str(a.loss_sizes).split(",") if x]
    return a


def main(argv=None) -> int:
    global OUT_PATH
    args = parse_args(argv)
    if args.out:
        OUT_PATH = Path(args.out)
    elif os.environ.get("OUT"):
        OUT_PATH = Path(os.environ["OUT"]) / ("gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json")
    else:
        OUT_PATH = REPO / "benchmarks" / "results" / ("gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json")
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        log("no CUDA device: use --cpu-smoke to run the code paths on CPU")
        return 2
    RESULTS["args"] = {k: v for k, v in vars(args).items()}
    RESULTS["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    log("== env")
    try:
        RESULTS["env"] = section_env(device)
    except Exception as e:
        RESULTS["env"] = {"error": repr(e)}
        traceback.print_exc()
    backends, skipped = available_backends(device)
    RESULTS["backends"] = {"available": backends, "skipped": skipped}
    save()
    status = 0
    if "correctness" in args.sections:
        log("\n== correctness: packed row vs samples one by one (relative L2 error)")
        try:
            corr = section_correctness(args, device, backends)
            if not corr.get("all_as_expected"):
                status = 1
        except Exception as e:
            RESULTS["sections"]["correctness_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            status = 1
        save()
    if "kernels" in args.sections:
        log("\n== kernels: --kernels liger / liger-flce and --compile vs the reference (bf16)")
        try:
            from gpu_check_kernels import section_kernels

            kern = section_kernels(args, device, small_model, backends, log,
                                   lambda: args.budget_s - elapsed())
            RESULTS["sections"]["kernels"] = kern
            if not kern["all_pass"]:
                status = 1
        except Exception as e:
            RESULTS["sections"]["kernels_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            status = 1
        save()
    if "loss" in args.sections:
        log("\n== loss: cross-entropy from hidden states, forward+backward")
        try:
            section_loss(args, device)
        except Exception as e:
            RESULTS["sections"]["loss_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        save()
    if "throughput" in args.sections:
        log("\n== throughput: fwd+bwd+AdamW, bf16, chunked CE")
        try:
            section_throughput(args, device, backends)
        except Exception as e:
            RESULTS["sections"]["throughput_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            status = 1
        save()
    RESULTS["wall_s"] = elapsed()
    save()
    final_table()
    return status


if __name__ == "__main__":
    sys.exit(main())
