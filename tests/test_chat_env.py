"""The chat environment (pack/chat_env.py) that chat templates render in: equal to
transformers' rendering for every trl template, and as strict as the immutable sandbox."""

from __future__ import annotations

import copy

import pytest

from pack.chat_env import compile_chat_template, template_variables
from pack.offline import package_file
from pack.tokenize.loading import load_tokenizer

TEMPLATES = sorted(p.stem for p in package_file("trl", "chat_templates").glob("*.jinja"))
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 \n"}, {"role": "user", "content": "caf\u00e9 \u4e2d"},
     {"role": "assistant", "content": "<think>x</think>ok"}],
    [{"role": "user", "content": "only a question"}],
]


@pytest.fixture(scope="module")
def full_tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_env_renders_every_trl_template_like_transformers(name, full_tok):
    tok = full_tok
    source = package_file("trl", f"chat_templates/{name}.jinja").read_text()
    compiled = compile_chat_template(source)
    variables = template_variables(dict(tok.special_tokens_map))
    compared = 0
    for conv in CONVERSATIONS:
        for agp in (False, True):
            try:
                theirs = tok.apply_chat_template(conv, tokenize=False, chat_template=source,
                                                 add_generation_prompt=agp)
            except Exception as e:
                with pytest.raises(type(e)):
                    compiled.render(messages=conv, tools=None, documents=None,
                                    add_generation_prompt=agp, **variables)
                continue
            mine = compiled.render(messages=conv, tools=None, documents=None,
                                   add_generation_prompt=agp, **variables)
            assert mine == theirs, (name, conv, agp)
            compared += 1
    assert compared >= 2  # every template renders a plain conversation


def test_chat_env_keeps_the_sandbox():
    with pytest.raises(Exception, match="underscore|unsafe|access"):
        compile_chat_template("{% set ns = namespace(_x=1) %}{{ ns._x }}").render(messages=[])
    with pytest.raises(Exception):
        compile_chat_template("{{ messages.__class__.__mro__ }}").render(messages=[])


SNIPPETS = [
    "{% for m in messages %}{{ loop.index0 }}{{ loop.last }}{{ loop.length }}{% endfor %}",
    "{% for m in messages %}{{ m.role }}{{ m.content.strip() }}{{ m.missing }}{% endfor %}",
    "{{ messages[0].items() | list }}{{ messages[0].keys is callable }}",  # dict methods stay
    "{{ messages[1]['items'] }}{{ messages[1].items() | list }}",  # a key named like a method
    "{{ 'a b'.split() }}{{ 'x'.upper() }}{{ 'x'.nope }}",
    "{{ 'x'.__class__.__mro__ }}",
    "{% for m in messages %}{{ loop.__class__.__mro__ }}{% endfor %}",
    "{{ messages[0].__class__ }}{{ messages[0].__class__.__mro__ }}",
    "{{ 'x'.format.__globals__ }}",
    "{{ messages.append is callable }}{{ messages[0].update({'a': 1}) }}",
]


@pytest.mark.parametrize("source", SNIPPETS)
def test_chat_env_shortcut_decides_like_the_sandbox(source):
    """The environment's short way through attribute checks gives what the plain immutable
    sandbox gives: the same text, or the same kind of refusal."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from pack.chat_env import _Generation

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=[_Generation, "jinja2.ext.loopcontrols"])
    messages = [{"role": "user", "content": " hi "}, {"role": "a", "content": "b", "items": 5}]

    def outcome(template):
        try:
            return "ok", template.render(messages=copy.deepcopy(messages))
        except Exception as e:  # noqa: BLE001 - the kind of refusal is what is compared
            return "error", type(e).__name__

    assert outcome(compile_chat_template(source)) == outcome(plain.from_string(source))
