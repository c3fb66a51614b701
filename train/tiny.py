"""Small random-weight causal LMs of real architectures, saved as Hugging Face model directories.

No package ships real weights, so the demo, tests and benchmarks build models from configs:
the layout of Llama, Qwen2, Qwen3 or Mistral, any size, with a real tokenizer copied in so the
directory is what `train-run --model` and `from_pretrained` expect.

    python -m train.tiny --tokenizer TOKDIR --arch qwen3 --hidden 64 --layers 2 OUT
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model")


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int | None = None, max_positions: int = 32768,
                bos_token_id: int | None = None, eos_token_id: int | None = None,
                tie_word_embeddings: bool = False, **overrides):
    """A transformers config of the named architecture (GQA when kv_heads < heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = dict(llama=LlamaConfig, qwen2=Qwen2Config, qwen3=Qwen3Config, mistral=MistralConfig)
    if arch not in cls:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads,
              intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
              bos_token_id=bos_token_id, eos_token_id=eos_token_id,
              tie_word_embeddings=tie_word_embeddings)
    if arch == "qwen3":
        kw["head_dim"] = hidden // heads
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return cls[arch](**kw)


def make_tiny_model(arch: str, tokenizer_dir: str | Path | None, out_dir: str | Path | None = None,
                    vocab_size: int | None = None, seed: int = 0, dtype: str = "float32",
                    **config_kwargs):
    """Build a random-weight model (seeded, so equal arguments give equal weights). With
    `out_dir`, save it in safetensors with the tokenizer files copied in and return the path;
    otherwise return the model."""
    import torch
    from transformers import AutoModelForCausalLM

    bos = eos = None
    if tokenizer_dir is not None:
        from pack.tokenize.loading import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        vocab_size = vocab_size or len(tok)
        bos, eos = tok.bos_token_id, tok.eos_token_id
    if vocab_size is None:
        raise ValueError("give tokenizer_dir or vocab_size")
    config = tiny_config(arch, vocab_size, bos_token_id=bos, eos_token_id=eos, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if out_dir is None:
        return model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    if src.is_file():  # a bare tokenizer.json
        shutil.copy2(src, dst / "tokenizer.json")
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--arch", default="qwen3", choices=ARCHS)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = make_tiny_model(a.arch, a.tokenizer, a.out, seed=a.seed, hidden=a.hidden,
                           layers=a.layers, heads=a.heads, kv_heads=a.kv_heads)
    print(f"wrote {a.arch} model to {path}")


if __name__ == "__main__":
    main()
