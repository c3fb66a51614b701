"""Load a local tokenizer (never downloading) and describe it for the manifest: the
fingerprint that says whether two datasets' token ids mean the same thing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import PacktrainError


# tokenizer_config.json classes that are the generic fast tokenizer itself: loaded directly,
# without AutoTokenizer (whose import pulls in torch through transformers' config machinery).
_GENERIC_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def _generic_tokenizer_dir(p: Path) -> bool:
    try:
        cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and cfg.get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES
            and not cfg.get("auto_map") and (p / "tokenizer.json").is_file())


def load_tokenizer(path: str | os.PathLike):
    """Load a local tokenizer: a Hugging Face tokenizer/model directory or a tokenizer.json.
    Never downloads (local_files_only); errors name the path. A directory whose
    tokenizer_config.json names the generic fast tokenizer class is loaded with that class
    directly (the same object AutoTokenizer returns, without importing torch)."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        if p.is_dir():
            if _generic_tokenizer_dir(p):
                return PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(p), local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PacktrainError(f"{p}: cannot load the tokenizer ({msg}); pass a Hugging Face "
                             f"tokenizer directory or a tokenizer.json") from None
    raise PacktrainError(f"{p}: no such tokenizer directory or tokenizer.json; pass --tokenizer "
                         f"PATH to a local tokenizer")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides the token ids a dataset holds: the token-to-id mapping (added
    tokens included), the special tokens and the chat template. Class names do not count."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]),
                        ensure_ascii=False).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(special, sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    h.update((template or "").encode())
    return "sha256:" + h.hexdigest()


def tokenizer_record(tokenizer, path: str) -> dict[str, Any]:
    """The manifest's `tokenizer` entry."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "path": str(path),
        "name": getattr(tokenizer, "name_or_path", "") or str(path),
        "vocab_size": len(tokenizer),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }
