"""Renders a chat template to exactly the text ``tokenizer.apply_chat_template(messages,
tokenize=False)`` gives, without its per-call overhead.

The template is compiled by transformers (its sandboxed environment, filters and globals:
``{% generation %}``, ``tojson``, ``raise_exception``, ``strftime_now``, ``dict``, ``namespace``)
and called with the variables apply_chat_template gives it. Calling it directly skips
apply_chat_template's per-call message normalisation, over half of a render's cost for
plain-string messages. The environment is an overlay of transformers' that takes a short way
through the sandbox's attribute checks (:func:`_quick_getattr`); nothing else of it differs.
Its first render is compared with apply_chat_template's and it is dropped on any difference, so
the text stays exactly the tokenizer's.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from types import MethodType
from typing import Any, Callable

import jinja2
from jinja2 import nodes

from ..errors import PacktrainError
from .records import Message, field_error

RenderFn = Callable[[list[dict], bool], str]


def resolve_source(tokenizer: Any, chat_template: str | None) -> str:
    """The chat template text: ``chat_template`` (a template string or a file path), else the
    tokenizer's own."""
    if chat_template:
        if "{" not in chat_template and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                return f.read()
        return chat_template
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    if not t:
        raise PacktrainError("the tokenizer has no chat template; pass --chat-template FILE "
                             "(a Jinja chat template) or use --template alpaca")
    return t


def _invalid_jinja(e: Exception) -> PacktrainError:
    return PacktrainError(f"the chat template is not valid Jinja ({e}); fix it or pass "
                          f"--chat-template FILE")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template as transformers compiles it for apply_chat_template (a ``jinja2.Template``),
    in an overlay of transformers' environment that takes :func:`_quick_getattr`'s short way
    through the sandbox's attribute checks. Raises PacktrainError for invalid Jinja."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        # an overlay, so that transformers' own cached template keeps its environment as it is
        env = _compile_jinja_template(source).environment.overlay()
        env.getattr = MethodType(_quick_getattr, env)
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise _invalid_jinja(e) from None


_DICT_ATTRIBUTES = frozenset(dir(dict))
_LoopContext = jinja2.runtime.LoopContext


def _quick_getattr(env: Any, obj: Any, attribute: str) -> Any:
    """The sandbox's ``getattr``, with a short way for what chat templates read on every
    message: ``loop.index0``, ``message.content``, ``content.strip``. For a string or a loop
    and a name without a leading underscore, the sandbox's checks (internal attribute, private
    name, method that mutates) always allow the attribute; for a dict and a name that is not a
    dict attribute, the sandbox returns the item unchecked. Both are done here without the
    checks; everything else goes through the sandbox. The checks are over half the render time
    of Llama 3's template (1,500 chitchat conversations render in 0.24 s this way, 0.55 s
    through the checks), and pack-build renders some records whole (520 of 3,000 chitchat
    conversations, two thirds of their text): their segments took 1.09 s of CPU without this,
    0.72 s with it."""
    kind = type(obj)
    if type(attribute) is str and attribute[:1] != "_":
        if kind is str or kind is _LoopContext:
            try:
                return getattr(obj, attribute)
            except AttributeError:
                pass
        elif kind is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass
    return type(env).getattr(env, obj, attribute)


def template_variables(special_tokens_map: dict[str, Any]) -> dict[str, Any]:
    """The extra variables apply_chat_template passes a template: the tokenizer's named special
    tokens (``bos_token``, ``eos_token``, ...) as plain strings."""
    out: dict[str, Any] = {}
    for key, value in special_tokens_map.items():
        if isinstance(value, (list, tuple)):
            out[str(key)] = [str(v) for v in value]
        elif value is not None:
            out[str(key)] = str(value)
    return out


def string_constants(environment: Any, source: str, skip: frozenset[str]) -> tuple[str, ...]:
    """String constants of the template (but those in ``skip`` and subscript keys), stripped,
    longest first: things a template may test a content for (``'</think>' in content``).
    ``environment`` is the one the template compiled in (it knows ``{% generation %}``)."""
    ast = environment.parse(source)
    keys = {id(n.arg) for n in ast.find_all(nodes.Getitem)}
    found = set()
    for node in ast.find_all(nodes.Const):
        v = node.value
        if isinstance(v, str) and id(node) not in keys:
            v = v.strip()
            if len(v) >= 2 and v not in skip:
                found.add(v)
    return tuple(sorted(found, key=len, reverse=True))


def special_tokens_re(tokenizer: Any) -> re.Pattern | None:
    """A pattern matching any special token of the tokenizer, longest first."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        for added in tokenizer.added_tokens_decoder.values():
            if getattr(added, "special", False):
                specials.add(str(added))
    except AttributeError:  # pragma: no cover - slow tokenizers
        pass
    specials = sorted((s for s in specials if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


class ChatRender:
    """``render(messages, add_generation_prompt)`` -> the template's text. ``direct`` is the
    compiled template called with apply_chat_template's variables, or None once it has
    disagreed with apply_chat_template."""

    def __init__(self, tokenizer: Any, source: str):
        self.tokenizer, self.source = tokenizer, source
        compiled = compile_template(source)
        self.environment = compiled.environment
        variables = template_variables(dict(tokenizer.special_tokens_map))
        self.direct: RenderFn | None = (
            lambda conv, agp: compiled.render(messages=conv, tools=None, documents=None,
                                              add_generation_prompt=agp, **variables))
        self.checked = False  # whether a direct render was compared with apply_chat_template

    def __call__(self, msgs: list[Message] | list[dict],
                 add_generation_prompt: bool = False) -> str:
        """The chat template's text for messages (pairs or dicts), as apply_chat_template."""
        conv = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in msgs]
        try:
            if self.direct is not None and conv and all(
                    type(m.get("content")) is str and type(m.get("role")) is str and len(m) == 2
                    for m in conv):
                text = self.direct(conv, add_generation_prompt)
                if self.checked:
                    return text
                self.checked = True
                if text == self._apply(conv, add_generation_prompt):
                    return text
                self.direct = None
            return self._apply(conv, add_generation_prompt)
        except PacktrainError:
            raise
        except Exception as e:  # jinja2 errors, raise_exception() in templates, ValueError
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise field_error("messages", f"the chat template rejected this conversation "
                                          f"({msg})") from None

    def _apply(self, conv: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            conv, tokenize=False, chat_template=self.source,
            add_generation_prompt=add_generation_prompt)
