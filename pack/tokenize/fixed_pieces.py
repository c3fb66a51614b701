"""Reuses the token ids of a template's fixed text at each end of a segment, exactly.

pack-build tokenizes a record as segments (the label boundaries fall between them), and a chat
template puts fixed text holding special tokens at the ends of most segments. Llama 3, a user turn
and the header of the assistant turn after it, one untrained segment::

    <|start_header_id|>user<|end_header_id|>\\n\\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    '------------------ K -------------------''-- x ---''------------------------- Q -------------------------------'

A fast tokenizer first cuts its input at added tokens and tokenizes each piece between them on
its own, so for a segment ``K + x + Q`` where ``K`` ends with an added token and ``Q`` starts
with one::

    tokens(K + x + Q) == tokens(K) + tokens(x) + tokens(Q)

``K`` and ``Q`` are tokenized once per process; each segment's tokenizer call sees only ``x``
("\\n\\nHi there"). On chitchat conversations with Llama 3 (short turns) that is 13% less
tokenizer work. The texts come from the template's layouts (:mod:`pack.templates.chat_layout`)
and the BOS/EOS tokens; any segment that starts with a ``K`` or ends with a ``Q`` gets the cut,
whatever produced it.

Why it is exact, and when it is used:

* the tokenizer treats each piece between added tokens alike wherever it lies: the pipelines of
  :func:`pack.tokenize.head_tokens.splits_locally` (one of three regular expressions, then byte-level
  without a prefix space; no normalizer or NFC; BPE without dropout). A SentencePiece
  ``Metaspace`` with ``prepend_scheme="first"`` treats the first piece differently: no reuse;
* every added token matches exactly its text: none strips whitespace beside it (``lstrip``,
  ``rstrip``), needs word boundaries (``single_word``), or, under a normalizer, is matched in
  normalized text (``normalized``);
* no added token can match across a cut: none can start inside ``K`` and continue past its end
  (its first j characters a suffix of ``K``), and none can start before ``Q`` and continue into
  it (its last characters a prefix of ``Q``). Checked against every added token when ``K`` and
  ``Q`` are prepared; one that fails is not used. Any other match lies wholly on one side of the
  cut, where the tokenizer's leftmost-longest scan sees the same text as on the whole segment;
* tokenized alone, ``K`` ends and ``Q`` starts with an added token exactly at the cut (checked
  with the tokenizer's offsets).

``PACKTRAIN_HEAD_TOKENS=0`` turns this off together with :mod:`pack.tokenize.head_tokens`.
Tests compare every pipeline with and without reuse, ids and labels alike.
"""

from __future__ import annotations

import re
from typing import Callable

from . import head_tokens

Tail = tuple[str, list[int]]  # (fixed trailing text Q, its ids)
MAX_TEXTS = 32  # per side: each segment is tested against every candidate


def usable(backend) -> bool:
    """Whether ``backend`` (a ``tokenizers.Tokenizer``) satisfies the module docstring's
    conditions on the pipeline and on every added token."""
    if not head_tokens.enabled() or not head_tokens.splits_locally(backend):
        return False
    has_normalizer = backend.normalizer is not None
    for tok in backend.get_added_tokens_decoder().values():
        if tok.lstrip or tok.rstrip or tok.single_word or (tok.normalized and has_normalizer):
            return False
    return True


def _crosses_end(k: str, contents: list[str]) -> bool:
    """Whether an added token could start inside ``k`` and continue past its end."""
    return any(k.endswith(t[:j]) for t in contents for j in range(1, len(t)))


def _crosses_start(q: str, contents: list[str]) -> bool:
    """Whether an added token could start before ``q`` and continue into it."""
    return any(q.startswith(t[i:]) for t in contents for i in range(1, len(t)))


def prepare(backend, texts: list[str], encode: Callable[[list[str]], list[list[int]]]
            ) -> tuple[list[head_tokens.Head], list[Tail]]:
    """From fixed template texts, the leading parts ``K`` (as :data:`pack.tokenize.head_tokens.Head`,
    cut at their end) and trailing parts ``Q`` whose ids can be reused, longest first."""
    added = backend.get_added_tokens_decoder()
    contents = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
    if not contents:
        return [], []
    added_ids = set(added)
    rx = re.compile("|".join(map(re.escape, contents)))
    ks: dict[str, None] = {}
    qs: dict[str, None] = {}
    for text in texts:
        found = list(rx.finditer(text))
        if found:
            ks.setdefault(text[:found[-1].end()])
            qs.setdefault(text[found[0].start():])

    def exact(s: str, at_end: bool) -> bool:  # the tokenizer's own added token at the cut
        e = backend.encode(s, add_special_tokens=False)
        if not e.ids:
            return False
        i = -1 if at_end else 0
        return e.ids[i] in added_ids and (e.offsets[i][1] == len(s) if at_end
                                          else e.offsets[i][0] == 0)

    ks_ok = [k for k in ks if not _crosses_end(k, contents) and exact(k, True)][:MAX_TEXTS]
    qs_ok = [q for q in qs if not _crosses_start(q, contents) and exact(q, False)][:MAX_TEXTS]
    ids = encode(ks_ok + qs_ok) if ks_ok or qs_ok else []
    fronts = [(k, len(k), list(i)) for k, i in zip(ks_ok, ids)]
    backs = [(q, list(i)) for q, i in zip(qs_ok, ids[len(ks_ok):])]
    fronts.sort(key=lambda h: len(h[0]), reverse=True)
    backs.sort(key=lambda t: len(t[0]), reverse=True)
    return fronts, backs


def cut(texts: list[str], heads: list[head_tokens.Head], tails: list[Tail]
        ) -> tuple[list[str], list[list[int] | tuple], list[list[int] | tuple]]:
    """``texts`` with the cached part of the first (longest) matching head cut from the front
    and the first matching trailing text cut from what is left, and per text the ids to put in
    front and after (``()`` where none matched, so that the three lists can be chained)."""
    starts = tuple(h for h, _, _ in heads)
    ends = tuple(q for q, _ in tails)
    out: list[str] = []
    pre: list[list[int] | tuple] = []
    post: list[list[int] | tuple] = []
    for t in texts:
        i, f, b = 0, (), ()
        if starts and t.startswith(starts):  # one C call rules out most texts
            for head, j, ids in heads:
                if t.startswith(head):
                    i, f = j, ids
                    break
        if ends and t.endswith(ends, i):  # a trailing text wholly after the front cut
            for q, ids in tails:
                if t.endswith(q, i):
                    out.append(t[i:len(t) - len(q)])
                    b = ids
                    break
        else:
            out.append(t[i:] if i else t)
        pre.append(f)
        post.append(b)
    return out, pre, post
