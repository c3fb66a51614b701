"""train-run --compile: torch.compile of each decoder layer, the varlen attention as a custom op.

Only the decoder layers are compiled (``layer.compile(dynamic=True)``, in place): the embedding,
the final norm, packtrain's chunked loss and DeepSpeed's hooks and collectives stay eager. Inside a
layer the packed attention is one opaque node (train.attention_op), so the graph does not unroll the
per-sample loop or break at the attention, and every layer of the model shares one graph. Dynamic
shapes make the pack length T and the number of samples symbols: packs of other lengths reuse the
graph instead of recompiling (tests/train/test_compile.py counts the compilations). Evaluation
(no gradients) compiles its own graph once.

Refused, in one line each: ZeRO-3 (its parameter gathering runs in module hooks inside the layers,
which the compiled graph would trace), --sequence-parallel (its attention wrapper is not an op),
and a CPU without a C++ compiler or a GPU without triton (inductor's code generators).
"""

from __future__ import annotations

import importlib.util
import shutil
from argparse import Namespace
from typing import Any

import torch

from pack.errors import PacktrainError

__all__ = ["check_compile", "compile_decoder_layers"]


def check_compile(args: Namespace, device: torch.device) -> None:
    """Refuse --compile where it cannot run or is not checked, naming the option in conflict."""
    if not getattr(args, "compile", False):
        return
    if int(args.zero) == 3:
        raise PacktrainError("--compile does not support --zero 3 (ZeRO-3 gathers parameters in "
                             "module hooks inside the compiled layers); use --zero 0, 1 or 2")
    if int(getattr(args, "sequence_parallel", 1) or 1) > 1:
        raise PacktrainError("--compile does not support --sequence-parallel; drop one of them")
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise PacktrainError("--compile on CPU needs a C++ compiler (g++) for torch's inductor; "
                             "install one or train without --compile")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise PacktrainError("--compile on CUDA needs triton (torch's inductor generates triton "
                             "kernels); install it or train without --compile")


def compile_decoder_layers(model: Any, backend: str) -> str:
    """Switch `model`'s packtrain attention `backend` to its custom-op form and compile each decoder
    layer in place; returns what was done, for the start-up line."""
    from train.attention_op import enable_compiled_attention
    from train.loss import model_hidden_and_head

    decoder = model_hidden_and_head(model).decoder
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise PacktrainError(f"--compile: {type(decoder).__name__} has no list of decoder layers "
                             f"(.layers) to compile; train without --compile")
    name = enable_compiled_attention(model, backend)
    for layer in layers:
        layer.compile(dynamic=True)
    return f"{len(layers)} decoder layers (dynamic shapes), attention {name}"
