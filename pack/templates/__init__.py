"""Render a record into text segments with a loss mask: ``[(text, trained), ...]``.

API (used by ``pack.build``)::

    r = Renderer(tokenizer, fmt, template, train_on_prompt=False, chat_template=None)
    r.segments(record)       -> [(text, trained), ...]    raises PacktrainError / NothingToTrain
    r.encode_batch(records)  -> [(input_ids int32, labels int32) | PacktrainError, ...]

``fmt`` is the record format (``alpaca`` | ``messages`` | ``text`` | ``preference``),
``template`` how it is rendered, one small renderer per kind:

``alpaca``  (:mod:`.alpaca`) the Stanford Alpaca prompt, word for word (``PROMPT_INPUT`` /
            ``PROMPT_NO_INPUT``), the response right after ``### Response:`` and then the EOS
            token. Optional ``system`` and ``history``. BOS first when the tokenizer has one (and
            it differs from EOS). ``messages`` records may use it when they hold one user and one
            assistant turn (and an optional system message).
``chat``    (:mod:`.chat`) the tokenizer's chat template (or ``chat_template=``, a template string
            or a file path). Roles system/user/assistant (ShareGPT ``from``: system/human/gpt,
            also user/assistant). Each assistant turn's content is trained together with the
            template's end-of-turn text right after it: a special token right after the content
            (``<|eot_id|>``, ``<|im_end|>``), else the template's closing of a final turn through
            its first special token, or without trailing whitespace when it holds none
            (``<|im_end|>`` of ChatML on a tokenizer without that token). Headers, system and
            user turns are not trained. The text is exactly ``tokenizer.apply_chat_template(
            messages, tokenize=False)``. ``alpaca`` records go through it as messages
            ``[system?], (history user/assistant)*, user, assistant``, the last user turn
            ``instruction`` or ``instruction + "\\n\\n" + input``. Only ``role`` and ``content``
            of a message reach the template; other keys (``name``, ``tool_calls``, ``weight``)
            are ignored.
``none``    (:mod:`.text`) ``text`` records: BOS (as above) + text + EOS, all trained.

``preference`` records (:mod:`.preference`: ``chosen`` + ``rejected``, with a ``prompt``, a
``messages`` prompt or an implicit one) render through ``chat`` or, all strings, ``none`` (BOS +
prompt untrained, completion + EOS trained) into *two* entries per record in
:meth:`Renderer.encode_flat`, chosen then rejected, each starting with the same prompt text as a
segment of its own; only completions are trained. ``train_on_prompt`` is refused for them.

``train_on_prompt=True`` trains every segment. Whatever the template, ``labels[0]`` is -100.

Records are checked and normalised in :mod:`.records`. Nothing to train: a record whose response
is empty (alpaca ``output`` blank, no assistant turn or only blank assistant turns, empty
``text``) raises :class:`NothingToTrain`, a PacktrainError subclass with ``.reason``
(``"empty-response"``, ``"no-assistant-turn"``, ``"empty-text"``). The builder drops such a
record and counts ``dropped[e.reason]``; check ``isinstance(e, NothingToTrain)`` *before* treating
a PacktrainError as fatal. Other PacktrainErrors name the field (``field output: expected a
string, got number``); the caller prefixes ``FILE:LINE: ``.

Chat rendering is cheap: for each role sequence the template is rendered once and the fixed text
between the contents cached (:mod:`.chat_layout`); records are assembled by concatenation and
checked against a real render where a template could have rendered them otherwise
(:mod:`.chat`). Renders call the template compiled as transformers compiles it, with
apply_chat_template's variables (:mod:`.chat_render`).

Tokenizing is not done here: :class:`Renderer` hands the segments to
:class:`pack.tokenize.segments.SegmentEncoder` (one Rust call per batch, label boundaries exact,
fixed template text's ids reused), telling it the fixed texts a template writes.

Workers: a Renderer pickles (its tokenizer pickles; caches are dropped) but a tokenizer is a
~7 MB pickle, so prefer ``Renderer.from_config(renderer.config(), tokenizer)`` in each worker,
with the tokenizer loaded there by ``pack.tokenize.loading.load_tokenizer``. ``config()`` is a
small JSON-able dict holding the resolved chat template text.
"""

from __future__ import annotations

from .alpaca import PROMPT_INPUT, PROMPT_NO_INPUT
from .chat import VERIFY_FIRST
from .records import ROLES, SHAREGPT_ROLES, NothingToTrain
from .renderer import ALLOWED, DEFAULT_TEMPLATE, TEMPLATES, Renderer

__all__ = ["ALLOWED", "DEFAULT_TEMPLATE", "PROMPT_INPUT", "PROMPT_NO_INPUT", "ROLES",
           "SHAREGPT_ROLES", "TEMPLATES", "VERIFY_FIRST", "NothingToTrain", "Renderer"]
