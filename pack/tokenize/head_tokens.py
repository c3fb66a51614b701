"""Tokenizes a prompt's fixed leading text once per process, and reuses those ids, exactly.

Every Alpaca record starts with the same header ("Below is an instruction that describes a
task, ... completes the request.\\n\\n### Instruction:\\n"), a third of an Alpaca corpus's
characters. pack-build tokenizes a record's first segment from a cut point ``j`` inside that
header and puts the header's cached ids in front, when the tokenizer provably gives the same
ids as tokenizing the whole text::

    tokens(text) == tokens(head[:j]) + tokens(text[j:])   for every text starting with head

Worked example (Llama 3): the header is cut before " request", so ``tokens(head[:j])`` ends
``... 'Ġappropriately', 'Ġcompletes', 'Ġthe'`` and each record tokenizes
``" request.\\n\\n### Instruction:\\n" + instruction + ...``.

Why it is exact. A fast tokenizer first splits the text at added tokens, normalizes each piece,
cuts it into pre-tokens with a regular expression, and runs BPE inside each pre-token alone. The
cut ``j`` is placed where ``head[j-1]`` is an ASCII letter, ``head[j]`` a space and
``head[j+1]`` a letter (all fixed text), and it is used only when:

* the pre-tokenizer is one of the regular expressions below (GPT-2's; Llama 3's, i.e. cl100k's;
  Qwen2's) followed by byte-level mapping without an added prefix space. In each of them the
  only alternatives that can hold a letter are letter runs (with at most one leading character,
  taken where the run starts) and the ``'s``-style contractions, and none of them continues over
  a space. So a pre-token ends at ``j`` whatever follows, and every match before ``j`` sees the
  same characters (a letter run stops at the space or at the end of ``head[:j]`` alike; the one
  lookahead, ``\\s+(?!\\S)``, only follows whitespace, and ``head[j-1]`` is a letter). The
  expressions have no lookbehind and no anchors, so the scan that resumes at ``j`` is the scan
  of ``text[j:]`` on its own;
* the normalizer is none or NFC (NFC cannot join a letter, a space and a letter across ``j``);
* the model is BPE without dropout, and no truncation or padding is set;
* no added token could match over ``head[j-1:j+2]`` (matching there, or stripping whitespace
  into it, would move the piece boundaries): checked against the fixed text, counting every
  place a token's text would fit.

Anything else (SentencePiece-style Metaspace, other expressions, other normalizers) gets no
reuse and every text is tokenized whole, as before. ``PACKTRAIN_HEAD_TOKENS=0`` turns reuse off
(used by tests and by ``benchmarks/pack_speed.py`` to show both).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

# The pre-tokenizer expressions the argument above was checked for, verbatim from tokenizer.json.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                  r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LOCAL_PATTERNS = frozenset({LLAMA3_PATTERN, QWEN2_PATTERN})
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

Head = tuple[str, int, list[int]]  # (fixed leading text, cut point, ids of text[:cut])


def enabled() -> bool:
    return os.environ.get("PACKTRAIN_HEAD_TOKENS", "1").strip().lower() not in (
        "0", "false", "no", "off")


def _state(component) -> dict[str, Any] | None:
    if component is None:
        return None
    return json.loads(component.__getstate__())


def splits_locally(backend) -> bool:
    """Whether ``backend`` (a ``tokenizers.Tokenizer``) tokenizes pre-tokens independently with
    one of the expressions the module docstring argues for."""
    try:
        norm = _state(backend.normalizer)
        pre = _state(backend.pre_tokenizer)
        model = backend.model
    except Exception:  # an object that is not a tokenizers.Tokenizer
        return False
    if norm is not None and norm.get("type") != "NFC":
        return False
    if type(model).__name__ != "BPE" or getattr(model, "dropout", None) not in (None, 0.0):
        return False
    if backend.truncation is not None or backend.padding is not None:
        return False
    if pre is None:
        return False
    if pre.get("type") == "ByteLevel":  # GPT-2's own expression, built in
        return pre.get("use_regex") is True and pre.get("add_prefix_space") is False
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", ())) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split.get("type") == "Split"
            and split.get("pattern", {}).get("Regex") in LOCAL_PATTERNS
            and split.get("behavior") == "Isolated" and split.get("invert") is False
            and byte_level.get("type") == "ByteLevel"
            and byte_level.get("use_regex") is False
            and byte_level.get("add_prefix_space") is False)


def _could_touch(content: str, head: str, j: int) -> bool:
    """Whether an added token's text fits anywhere over head[j-1:j+2] (text after the head is
    unknown, so it fits there)."""
    n = len(content)
    for s in range(max(0, j - n), j + 2):  # every start where it overlaps j-1..j+1
        if all(s + k >= len(head) or head[s + k] == ch for k, ch in enumerate(content)):
            return True
    return False


def cut_point(head: str, added: list[str]) -> int | None:
    """The last ``j`` with head[j-1], head[j], head[j+1] = letter, space, letter where no added
    token in ``added`` could match over head[j-1:j+2]; None if there is none."""
    for j in range(len(head) - 2, 0, -1):
        if head[j] == " " and head[j - 1] in _LETTERS and head[j + 1] in _LETTERS:
            if not any(c and _could_touch(c, head, j) for c in added):
                return j
    return None


def prepare(backend, heads: list[str], encode: Callable[[list[str]], list[list[int]]]
            ) -> list[Head]:
    """Cut points and cached ids for each head that can be reused with ``backend`` (longest
    first, so the most specific head matches); [] when the tokenizer does not split locally."""
    if not enabled() or not splits_locally(backend):
        return []
    added = [t.content for t in backend.get_added_tokens_decoder().values()]
    cuts = []
    for head in sorted(set(heads), key=len, reverse=True):
        j = cut_point(head, added)
        if j is not None:
            cuts.append((head, j))
    if not cuts:
        return []
    ids = encode([h[:j] for h, j in cuts])
    return [(h, j, list(i)) for (h, j), i in zip(cuts, ids)]
