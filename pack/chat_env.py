"""The Jinja environment chat templates render in, built without importing transformers.

transformers renders a chat template in a sandboxed Jinja environment with a fixed set of
options, filters and globals (``trim_blocks``, ``lstrip_blocks``, loop controls, a
``{% generation %}`` block, ``tojson`` that keeps non-ASCII text, ``raise_exception``,
``strftime_now``, a ``dict`` and a ``namespace`` that refuse private names). pack-build renders
through :func:`compile_chat_template` so that its workers need no transformers import; every
render path is checked against ``apply_chat_template`` (once per process, or by
:mod:`pack.fast_tokenizer` for a build), so a drift between the two is caught, not trusted.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (which marks assistant text for masks in
    transformers) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: Any):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the rendered text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` for templates, without the class itself (no attribute escapes)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed names (no CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace "
                f"({name!r})")


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with a short way through its attribute checks for what chat templates read
    on every message: ``loop.index0``, ``message.content``, ``content.strip``. For a string or a
    loop and a name without a leading underscore, the sandbox's checks (internal attribute,
    private name, method that mutates) always allow the attribute; for a dict and a name that is
    not a dict attribute, the sandbox returns the item unchecked. Both are done here without the
    checks; everything else goes through the sandbox. The checks were about two thirds of the
    render time of Llama 3's template on long conversations."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if type(attribute) is str and attribute[:1] != "_":
            if kind is str or kind is jinja2.runtime.LoopContext:
                try:
                    return getattr(obj, attribute)
                except AttributeError:
                    pass
            elif kind is dict and attribute not in _DICT_ATTRIBUTES:
                try:
                    return obj[attribute]
                except KeyError:
                    pass
        return super().getattr(obj, attribute)


def environment() -> ImmutableSandboxedEnvironment:
    """A fresh environment configured as transformers configures its chat-template one."""
    env = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True,
                           extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template; raises ``jinja2.TemplateSyntaxError`` for invalid Jinja."""
    return environment().from_string(source)


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
