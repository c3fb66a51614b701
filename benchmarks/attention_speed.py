#!/usr/bin/env python
"""Claim: on a packed row, varlen attention (per-sample SDPA on CPU; torch varlen / flash-attn on CUDA)
is much faster than dense SDPA with a block-diagonal mask, and gives the same output.

Attention alone (forward + backward) on one packed row of samples with Alpaca-like lengths
(lognormal, median 250, capped at 2048), GQA 14 query / 2 kv heads, head_dim 64 (Qwen2.5-0.5B).
For each row size and backend: median time of fwd+bwd, and max |out - per-sample reference|.

  python benchmarks/attention_speed.py                 # CPU: 2048, 4096
  python benchmarks/attention_speed.py --sizes 4096,16384 --dtype bf16   # on a GPU
Writes benchmarks/results/attention_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train.attention import (  # noqa: E402
    flash_attn_available,
    packtrain_flash_attention,
    packtrain_sdpa_attention,
    packtrain_torch_attention,
    torch_varlen_available,
)


def lengths_for(size: int, seed: int, median: int = 250, sigma: float = 0.9, cap: int = 2048) -> list[int]:
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while True:
        n = int(np.clip(round(rng.lognormal(math.log(median), sigma)), 8, min(cap, size)))
        if total + n > size:
            if size - total >= 8:
                out.append(size - total)  # fill the row exactly: every backend sees the same T
            elif out:
                out[-1] += size - total
            return out
        out.append(n)
        total += n


def dense_masked(module, q, k, v, _mask, cu, **kw):
    """SDPA over the whole row with a block-diagonal causal boolean mask [T, T]."""
    total = q.shape[2]
    lengths = (cu[1:] - cu[:-1]).long()
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
    i = torch.arange(total, device=q.device)
    mask = (sample[:, None] == sample[None, :]) & (i[:, None] >= i[None, :])
    n_rep = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), attn_mask=mask)
    return o.transpose(1, 2), None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="packed attention speed")
    p.add_argument("--sizes", default=None, help="row sizes (default CPU 2048,4096; CUDA 2048,8192,32768)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dense-max", type=int, default=8192, help="skip dense masked SDPA above this size")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "attention_speed.json"))
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    sizes = [int(x) for x in (a.sizes or ("2048,8192,32768" if device.type == "cuda" else "2048,4096")).split(",")]
    backends = {"packtrain_sdpa (per-sample)": packtrain_sdpa_attention, "dense sdpa + block mask": dense_masked}
    if torch_varlen_available(device)[0]:
        backends["packtrain_torch (varlen_attn)"] = packtrain_torch_attention
    if flash_attn_available(device)[0]:
        backends["packtrain_flash"] = packtrain_flash_attention
    module = nn.Module()
    module.is_causal = True
    rows = []
    print(f"device {device}, dtype {dtype}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}")
    print(f"{'T':>6s} {'samples':>7s} {'backend':30s} {'fwd+bwd ms':>11s} {'max|diff|':>10s}")
    for size in sizes:
        lengths = lengths_for(size, seed=size)
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(1, a.heads, size, a.head_dim, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(1, a.kv_heads, size, a.head_dim, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(1, a.kv_heads, size, a.head_dim, generator=g).to(device, dtype).requires_grad_()
        kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        with torch.no_grad():
            ref, _ = packtrain_sdpa_attention(module, q, k, v, None, **kw)
        for name, fn in backends.items():
            if fn is dense_masked and size > a.dense_max:
                rows.append({"T": size, "backend": name, "skipped": f"> --dense-max {a.dense_max}"})
                continue
            try:
                times = []
                for r in range(a.repeats + 1):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    out, _ = fn(module, q, k, v, None, cu=cu, **kw) if fn is dense_masked else fn(module, q, k, v, None, **kw)
                    out.float().sum().backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if r:
                        times.append(time.perf_counter() - t)
                diff = (out.detach().float() - ref.float()).abs().max().item()
                row = {"T": size, "samples": len(lengths), "backend": name, "median_ms": 1000 * statistics.median(times),
                       "max_abs_diff": diff}
                print(f"{size:6d} {len(lengths):7d} {name:30s} {row['median_ms']:11.2f} {diff:10.2e}")
            except Exception as e:
                row = {"T": size, "backend": name, "error": f"{type(e).__name__}: {e}"}
                print(f"{size:6d} {len(lengths):7d} {name:30s} ERROR {row['error']}")
            rows.append(row)
            q.grad = k.grad = v.grad = None
    result = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
              "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "rows": rows}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
