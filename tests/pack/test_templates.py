"""pack.templates on the real Llama 3 tokenizer and real chitchat data: rendered text, labels,
special tokens, ShareGPT, a second (Qwen) template, errors, pickling, and a property test that the
cached chat shortcut always equals the real template render."""

from __future__ import annotations

import copy
import json
import pickle
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pack.errors import PacktrainError
from pack.tokenize.loading import load_tokenizer
from pack.offline import chat_template, chitchat_conversations, package_file
from pack.templates import NothingToTrain, Renderer
from pack.templates.chat_render import compile_template, template_variables

# Stanford Alpaca's PROMPT_DICT (train.py), written out here independently of pack.templates.
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def qwen_tok(tokenizer_dir):
    """A copy of the Llama 3 tokenizer with Qwen's ChatML special tokens and trl's qwen2_5
    template."""
    t = load_tokenizer(tokenizer_dir)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = chat_template("qwen2_5")
    return t


@pytest.fixture(scope="module")
def chats(chat_jsonl):
    return read_jsonl(chat_jsonl)


def decode(tok, ids):
    return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False,
                      clean_up_tokenization_spaces=False)


def check_sample(tok, out, text, trained_text):
    """input_ids decode to the text, trained tokens decode to the trained text."""
    assert not isinstance(out, Exception), out
    ids, labels = out
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and len(ids) == len(labels)
    assert labels[0] == -100
    m = labels != -100
    assert np.array_equal(labels[m], ids[m])
    assert decode(tok, ids) == text
    assert decode(tok, ids[m]) == trained_text


# ---------------------------------------------------------------- chat (Llama 3)

def test_chat_llama3_text_and_labels(tok, chats):
    r = Renderer(tok, "messages", "chat")
    outs = r.encode_batch(chats)
    eot = tok.convert_tokens_to_ids(EOT)
    hdr = tok.convert_tokens_to_ids("<|start_header_id|>")
    bos = tok.convert_tokens_to_ids(BOS)
    same_as_whole = 0
    for rec, out in zip(chats, outs):
        msgs = rec["messages"]
        text = tok.apply_chat_template(msgs, tokenize=False)
        # trl's llama3 template trims contents
        trained = "".join(m["content"].strip() + EOT for m in msgs if m["role"] == "assistant")
        check_sample(tok, out, text, trained)
        ids, labels = out
        # special tokens in the template text come out as single special ids
        assert (ids == eot).sum() == len(msgs) and (ids == hdr).sum() == len(msgs)
        assert ids[0] == bos and (ids == bos).sum() == 1
        # headers are not trained; every end-of-turn after an assistant turn is
        assert (labels == hdr).sum() == 0
        assert (labels == eot).sum() == sum(m["role"] == "assistant" for m in msgs)
        same_as_whole += ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    print(f"\nchat: {same_as_whole}/{len(chats)} samples tokenize exactly as the whole text")


def test_backend_matches_tokenizer_call(tok, chats):
    """The Rust batch encoder used by encode_batch gives what tokenizer(...) gives."""
    r = Renderer(tok, "messages", "chat")
    texts = [t for rec in chats[:20] for t, _ in r.segments(rec)]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert r.encoder.encode_texts(texts) == want


def test_segments_alternate_and_cover_text(tok, chats):
    r = Renderer(tok, "messages", "chat")
    rec = next(c for c in chats if len(c["messages"]) >= 4)
    segs = r.segments(rec)
    assert all(a[1] != b[1] for a, b in zip(segs, segs[1:]))  # neighbours differ
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(rec["messages"], tokenize=False)
    first_trained = next(t for t, f in segs if f)
    assistant = next(m["content"] for m in rec["messages"] if m["role"] == "assistant")
    assert first_trained == assistant.strip() + EOT
    assert segs[0][0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_sharegpt_equals_openai(tok, chats):
    r = Renderer(tok, "messages", "chat")
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    recs = [{"messages": [{"role": "system", "content": "You chat."}] + c["messages"]}
            for c in chats[:60]]
    share = [{"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                for m in c["messages"]]} for c in recs]
    a, b = r.encode_batch(recs), r.encode_batch(share)
    for x, y in zip(a, b):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
    # user/assistant as ShareGPT "from" values work too
    alt = [{"conversations": [{"from": m["role"], "value": m["content"]} for m in c["messages"]]}
           for c in recs[:5]]
    for x, y in zip(r.encode_batch(alt), a[:5]):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_verify_all_and_fresh_renderer_agree(tok, chats):
    fast = Renderer(tok, "messages", "chat")
    slow = Renderer(tok, "messages", "chat", verify_all=True)
    fast.encode_batch(chats[:100])  # warm caches: later records skip verification
    for x, y in zip(fast.encode_batch(chats[:100]), slow.encode_batch(chats[:100])):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


# ---------------------------------------------------------------- chat (Qwen 2.5)

def test_qwen_template_system_multiturn(qwen_tok, chats):
    r = Renderer(qwen_tok, "messages", "chat")
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    im_start = qwen_tok.convert_tokens_to_ids("<|im_start|>")
    recs = [{"messages": [{"role": "system", "content": f"You are helper {i}."}] + c["messages"]}
            for i, c in enumerate(chats[:120])]
    recs += [dict(c) for c in chats[120:160]]  # no system: the template adds its default one
    outs = r.encode_batch(recs)
    for rec, out in zip(recs, outs):
        msgs = rec["messages"]
        text = qwen_tok.apply_chat_template(msgs, tokenize=False)
        trained = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
        check_sample(qwen_tok, out, text, trained)
        ids, labels = out
        n_turns = len(msgs) + (msgs[0]["role"] != "system")
        assert (ids == im_end).sum() == n_turns and (ids == im_start).sum() == n_turns
        assert (labels == im_start).sum() == 0
    segs = r.segments(recs[0])
    assert segs[0][0].startswith("<|im_start|>system\nYou are helper 0.<|im_end|>\n")
    assert segs[0][0].endswith("<|im_start|>assistant\n") and not segs[0][1]
    assert segs[2][0].startswith("\n<|im_start|>user\n")  # newline after <|im_end|> not trained


def test_qwen3_reasoning_is_placed(qwen_tok):
    """Qwen3 drops reasoning from earlier turns and rewrites the last one: the shortcut detects
    it and the text still equals the real render."""
    r = Renderer(qwen_tok, "messages", "chat", chat_template=chat_template("qwen3"))
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>hmm</think>hello"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "<think>\nstep\n</think>\n\nbye"}]
    segs = r.segments({"messages": msgs})
    assert "".join(t for t, _ in segs) == qwen_tok.apply_chat_template(
        msgs, tokenize=False, chat_template=r.chat_template)
    assert [t for t, f in segs if f] == ["hello<|im_end|>",
                                        "<think>\nstep\n</think>\n\nbye<|im_end|>"]


# ---------------------------------------------------------------- alpaca

def stanford_text(rec):
    prompt = (STANFORD_INPUT if rec.get("input") else STANFORD_NO_INPUT).format(**rec)
    return BOS + prompt + rec["output"] + EOT


def test_alpaca_text_and_labels(tok, alpaca_jsonl):
    recs = read_jsonl(alpaca_jsonl)
    assert any(r["input"] for r in recs) and any(not r["input"] for r in recs)
    r = Renderer(tok, "alpaca", "alpaca")
    for rec, out in zip(recs, r.encode_batch(recs)):
        check_sample(tok, out, stanford_text(rec), rec["output"] + EOT)


def test_alpaca_system_and_history(tok):
    r = Renderer(tok, "alpaca", "alpaca")
    rec = {"system": "Be brief.", "instruction": "And 3+3?", "output": "6",
           "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]]}
    segs = r.segments(rec)
    assert segs == [
        (BOS + "Be brief.\n\n" + STANFORD_NO_INPUT.format(instruction="What is 1+1?"), False),
        ("2" + EOT, True),
        (STANFORD_NO_INPUT.format(instruction="And 2+2?"), False),
        ("4" + EOT, True),
        (STANFORD_NO_INPUT.format(instruction="And 3+3?"), False),
        ("6" + EOT, True)]
    ids, labels = r.encode_batch([rec])[0]
    assert decode(tok, ids[labels != -100]) == "2" + EOT + "4" + EOT + "6" + EOT


def test_alpaca_through_chat_template(tok):
    r = Renderer(tok, "alpaca", "chat")
    rec = {"system": "S", "instruction": "Translate", "input": "bonjour", "output": "hello",
           "history": [["hi", "hey"]]}
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hey"},
            {"role": "user", "content": "Translate\n\nbonjour"},
            {"role": "assistant", "content": "hello"}]
    a = r.encode_batch([rec])[0]
    b = Renderer(tok, "messages", "chat").encode_batch([{"messages": msgs}])[0]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_messages_through_alpaca_template(tok):
    r = Renderer(tok, "messages", "alpaca")
    one = {"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    assert r.segments(one) == Renderer(tok, "alpaca", "alpaca").segments(
        {"system": "Sys", "instruction": "Q", "output": "A"})
    multi = {"messages": one["messages"] + [{"role": "user", "content": "Q2"},
                                             {"role": "assistant", "content": "A2"}]}
    with pytest.raises(PacktrainError, match="field messages: the alpaca template takes one"):
        r.segments(multi)


# ---------------------------------------------------------------- text, train_on_prompt

def test_text_format(tok):
    r = Renderer(tok, "text", "none")
    ids, labels = r.encode_batch([{"text": "Hello world."}])[0]
    assert decode(tok, ids) == BOS + "Hello world." + EOT
    assert labels[0] == -100 and np.array_equal(labels[1:], ids[1:])


def test_train_on_prompt(tok, chats, alpaca_jsonl):
    for r, recs in ((Renderer(tok, "messages", "chat", train_on_prompt=True), chats[:20]),
                    (Renderer(tok, "alpaca", "alpaca", train_on_prompt=True),
                     read_jsonl(alpaca_jsonl)[:20])):
        for ids, labels in r.encode_batch(recs):
            assert labels[0] == -100 and np.array_equal(labels[1:], ids[1:])


def test_gpt2_style_no_bos(qwen_tok):
    """A tokenizer whose BOS equals its EOS (GPT-2 style) gets no BOS; label 0 is still -100."""
    bos = qwen_tok.bos_token
    qwen_tok.bos_token = qwen_tok.eos_token
    try:
        r = Renderer(qwen_tok, "text", "none")
        assert r.segments({"text": "abc"}) == [("abc" + EOT, True)]
        ids, labels = r.encode_batch([{"text": "abc def"}])[0]
        assert labels[0] == -100 and np.array_equal(labels[1:], ids[1:])
    finally:
        qwen_tok.bos_token = bos
    assert Renderer(qwen_tok, "text", "none").segments({"text": "abc"})[0] == (BOS, False)


# ---------------------------------------------------------------- errors and drops

A, M, T = ("alpaca", "alpaca"), ("messages", "chat"), ("text", "none")
U = {"role": "user", "content": "a"}
FIELD_ERRORS = [
    (A, {"output": "x"}, "field instruction: missing"),
    (A, {"instruction": "x"}, "field output: missing"),
    (A, {"instruction": "x", "output": 3}, "field output: expected a string, got number"),
    (A, {"instruction": ["x"], "output": "y"}, "field instruction: expected a string, got array"),
    (A, {"instruction": "x", "input": {}, "output": "y"},
     "field input: expected a string, got object"),
    (A, {"instruction": "x", "output": "y", "history": "no"}, "field history: expected an array"),
    (A, {"instruction": "x", "output": "y", "history": [["a"]]},
     r"field history\[0\]: expected \[instruction, output\]"),
    (A, {"instruction": "x", "output": "y", "history": [["a", 1]]},
     r"field history\[0\]\[1\]: expected a string, got number"),
    (M, {"messages": "hi"}, "field messages: expected an array of messages, got string"),
    (M, {"messages": []}, "field messages: empty conversation"),
    (M, {"messages": [U, "b"]}, r"field messages\[1\]: expected an object, got string"),
    (M, {"messages": [U, {"role": "bot", "content": "b"}]},
     r"field messages\[1\].role: unknown role 'bot'"),
    (M, {"messages": [{"role": "user"}]}, r"field messages\[0\].content: missing"),
    (M, {"messages": [{"role": "user", "content": None}]},
     r"field messages\[0\].content: expected a string, got null"),
    (M, {"messages": [{"content": "x"}]}, r"field messages\[0\].role: missing"),
    (M, {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     r"field conversations\[1\].from: unknown role 'bot'"),
    (M, {"conversations": [{"from": "human", "value": 5}]},
     r"field conversations\[0\].value: expected a string, got number"),
    (M, {"chat": []}, "field messages: missing"),
    (T, {"txt": "a"}, "field text: missing"),
    (T, {"text": 1.5}, "field text: expected a string, got number"),
]


@pytest.mark.parametrize("fmt_template,rec,message", FIELD_ERRORS)
def test_field_errors(tok, fmt_template, rec, message):
    r = Renderer(tok, *fmt_template)
    with pytest.raises(PacktrainError, match=message) as e:
        r.segments(rec)
    assert not isinstance(e.value, NothingToTrain)
    assert "\n" not in str(e.value)
    out = r.encode_batch([rec])
    assert isinstance(out[0], PacktrainError) and str(out[0]) == str(e.value)


@pytest.mark.parametrize("fmt,template,rec,reason", [
    ("alpaca", "alpaca", {"instruction": "x", "output": ""}, "empty-response"),
    ("alpaca", "alpaca", {"instruction": "x", "output": " \n"}, "empty-response"),
    ("alpaca", "chat", {"instruction": "x", "output": ""}, "empty-response"),
    ("messages", "chat", {"messages": [{"role": "user", "content": "a"}]}, "no-assistant-turn"),
    ("messages", "chat", {"messages": [{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": ""}]}, "empty-response"),
    ("text", "none", {"text": ""}, "empty-text"),
])
def test_nothing_to_train(tok, fmt, template, rec, reason):
    r = Renderer(tok, fmt, template)
    with pytest.raises(NothingToTrain) as e:
        r.segments(rec)
    assert e.value.reason == reason and isinstance(e.value, PacktrainError)


def test_encode_batch_keeps_order_with_errors(tok, chats):
    r = Renderer(tok, "messages", "chat")
    recs = [chats[0], {"messages": [{"role": "bot", "content": "x"}]}, chats[1],
            {"messages": [{"role": "user", "content": "only a question"}]}, chats[2]]
    out = r.encode_batch(recs)
    assert isinstance(out[1], PacktrainError) and not isinstance(out[1], NothingToTrain)
    assert isinstance(out[3], NothingToTrain) and out[3].reason == "no-assistant-turn"
    good = r.encode_batch([chats[0], chats[1], chats[2]])
    for a, b in zip([out[0], out[2], out[4]], good):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert r.encode_batch([]) == []
    assert all(isinstance(x, PacktrainError) for x in r.encode_batch(recs[1:2] * 3))


def test_config_errors(tok, tokenizer_dir):
    with pytest.raises(PacktrainError, match="--template none cannot render messages"):
        Renderer(tok, "messages", "none")
    with pytest.raises(PacktrainError, match="--template chat cannot render text"):
        Renderer(tok, "text", "chat")
    assert Renderer(tok, "messages", "auto").template == "chat"
    assert Renderer(tok, "alpaca").template == "alpaca"
    with pytest.raises(PacktrainError, match="unknown record format"):
        Renderer(tok, "csv", "none")
    bare = load_tokenizer(tokenizer_dir)
    bare.chat_template = None
    with pytest.raises(PacktrainError, match="--chat-template FILE"):
        Renderer(bare, "messages", "chat")
    with pytest.raises(PacktrainError, match="not valid Jinja"):
        Renderer(tok, "messages", "chat", chat_template="{% for %}")


def test_chat_template_file_and_rejecting_template(tok, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(chat_template("qwen2_5"))
    r = Renderer(tok, "messages", "chat", chat_template=str(f))
    assert r.chat_template == chat_template("qwen2_5")
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('no system role') }}{% endif %}"
              "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    r = Renderer(tok, "messages", "chat", chat_template=strict)
    with pytest.raises(PacktrainError, match="field messages: the chat template rejected"):
        r.segments({"messages": [{"role": "system", "content": "s"},
                                 {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]})
    # a template with no special end-of-turn token: the closing newline is not trained
    segs = r.segments({"messages": [{"role": "user", "content": "u"},
                                    {"role": "assistant", "content": "a"}]})
    assert segs == [("user: u\nassistant: ", False), ("a", True), ("\n", False)]


@pytest.mark.parametrize("expr", ["m['content'] | replace('\\n', ' / ')", "m['content'] | upper",
                                  "m['content'] | e"])
def test_template_that_rewrites_contents(tok, chats, expr):
    """A template that changes contents in ways placeholders do not show: the probe render
    catches it, and every record comes out equal to the real render."""
    t = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' }}"
         "{{ " + expr + " }}{{ '<|eot_id|>' }}{% endfor %}")
    r = Renderer(tok, "messages", "chat", chat_template=t)
    plain = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant",
                                                              "content": "plain"}]}] * 3
    recs = plain + [{"messages": [{"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": "a\nb <i>&"}]}] + chats[:20]
    for rec in recs:
        segs = r.segments(rec)
        real = tok.apply_chat_template(rec["messages"], tokenize=False, chat_template=t)
        assert "".join(x for x, _ in segs) == real
        assert sum(f for _, f in segs) == sum(m["role"] == "assistant" for m in rec["messages"])


def test_direct_render_equals_apply_chat_template(tok, chats):
    """Renders skip apply_chat_template's per-call overhead but must give its exact text; a
    direct renderer that disagrees on its first render is dropped for good."""
    r = Renderer(tok, "messages", "chat")
    assert r.kind.render.direct is not None
    for rec in chats[:30]:
        for agp in (False, True):
            msgs = [(m["role"], m["content"]) for m in rec["messages"]]
            assert r.render(msgs, add_generation_prompt=agp) == tok.apply_chat_template(
                rec["messages"], tokenize=False, add_generation_prompt=agp)
    broken = Renderer(tok, "messages", "chat")
    broken.kind.render.direct = lambda conv, agp: "something else"
    msgs = [("user", "Q"), ("assistant", "A")]
    assert broken.render(msgs) == tok.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], tokenize=False)
    assert broken.kind.render.direct is None


# The compiled template (pack/templates/chat_render.py) took over from pack/chat_env.py: these
# checks of the environment and its short way through the sandbox came with it.
TRL_TEMPLATES = sorted(p.stem for p in package_file("trl", "chat_templates").glob("*.jinja"))
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 \n"}, {"role": "user", "content": "caf\u00e9 \u4e2d"},
     {"role": "assistant", "content": "<think>x</think>ok"}],
    [{"role": "user", "content": "only a question"}],
]


@pytest.mark.parametrize("name", TRL_TEMPLATES)
def test_compiled_template_renders_every_trl_template_like_transformers(name, tok):
    source = package_file("trl", f"chat_templates/{name}.jinja").read_text()
    compiled = compile_template(source)
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


def test_compiled_template_keeps_the_sandbox():
    with pytest.raises(Exception, match="underscore|unsafe|access"):
        compile_template("{% set ns = namespace(_x=1) %}{{ ns._x }}").render(messages=[])
    with pytest.raises(Exception):
        compile_template("{{ messages.__class__.__mro__ }}").render(messages=[])


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
    "{% generation %}{{ messages[0].content }}{% endgeneration %}",
]


@pytest.mark.parametrize("source", SNIPPETS)
def test_quick_getattr_decides_like_the_sandbox(source):
    """The compiled template's short way through attribute checks gives what transformers' own
    compiled template gives: the same text, or the same kind of refusal."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    messages = [{"role": "user", "content": " hi "}, {"role": "a", "content": "b", "items": 5}]

    def outcome(template):
        try:
            return "ok", template.render(messages=copy.deepcopy(messages))
        except Exception as e:  # noqa: BLE001 - the kind of refusal is what is compared
            return "error", type(e).__name__

    mine = compile_template(source)
    theirs = _compile_jinja_template(source)
    assert mine.environment is not theirs.environment  # transformers' own stays untouched
    assert outcome(mine) == outcome(theirs)


# ---------------------------------------------------------------- workers

def test_pickle_and_config(tok, chats):
    r = Renderer(tok, "messages", "chat", chat_template=chat_template("llama3"))
    want = r.encode_batch(chats[:30])
    cfg = r.config()
    json.dumps(cfg)
    for other in (Renderer.from_config(cfg, tok), pickle.loads(pickle.dumps(r))):
        for a, b in zip(other.encode_batch(chats[:30]), want):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ---------------------------------------------------------------- property: shortcut == render

EDGE = st.sampled_from(["", " ", "\n", "  \n", "\t", "\u3000", "\xa0"])
PIECE = st.sampled_from(["<|eot_id|>", "<|im_end|>", "<think>", "</think>", "<tool_response>",
                         "{{ x }}", "\n\n", "assistant", "<|start_header_id|>", "é", "😀"])
BODY = st.lists(st.one_of(st.text(max_size=12), PIECE), max_size=4).map("".join)
CONTENT = st.tuples(EDGE, BODY, EDGE).map("".join)


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(CONTENT)})
    turns = draw(st.integers(1, 5))
    for _ in range(turns):
        msgs.append({"role": "user", "content": draw(CONTENT)})
        msgs.append({"role": "assistant", "content": draw(CONTENT)})
    if draw(st.booleans()):
        msgs.pop()  # may end with a user turn
    return msgs


@pytest.fixture(scope="module")
def renderers(tok, qwen_tok):
    return {name: Renderer(qwen_tok if name != "llama3" else tok, "messages", "chat",
                           chat_template=chat_template(name))
            for name in ("llama3", "qwen2_5", "qwen3")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=conversations(), name=st.sampled_from(["llama3", "qwen2_5", "qwen3"]))
def test_property_shortcut_equals_render(renderers, msgs, name):
    r = renderers[name]
    real = r.tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=r.chat_template)
    try:
        segs = r.segments({"messages": msgs})
    except NothingToTrain:
        assert not any(m["content"].strip() for m in msgs if m["role"] == "assistant")
        return
    except PacktrainError as e:
        # only a template that rewrites earlier turns (qwen3 reasoning) may refuse a record
        assert name == "qwen3" and "</think>" in "".join(m["content"] for m in msgs), e
        return
    assert "".join(t for t, _ in segs) == real
    trained = "".join(t for t, f in segs if f)
    if name == "llama3":
        assert trained == "".join(m["content"].strip() + EOT for m in msgs
                                  if m["role"] == "assistant")
    elif name == "qwen2_5":
        assert trained == "".join(m["content"] + "<|im_end|>" for m in msgs
                                  if m["role"] == "assistant")


# ---------------------------------------------------------------- speed (printed, not asserted)

def test_speed_encode_batch(tok, capsys):
    recs = list(chitchat_conversations(limit=2000))
    r = Renderer(tok, "messages", "chat")
    t0, c0 = time.perf_counter(), time.process_time()
    out = []
    for i in range(0, len(recs), 500):
        out += r.encode_batch(recs[i:i + 500])
    t1, c1 = time.perf_counter(), time.process_time()
    for rec in recs:  # warm: rendering alone, every role sequence already seen
        r.segments(rec)
    t2 = time.perf_counter()
    tokens = sum(len(o[0]) for o in out)
    chars = sum(len(m["content"]) for rec in recs for m in rec["messages"])
    with capsys.disabled():
        print(f"\nencode_batch: {len(recs)} chitchat conversations ({chars:,} content chars, "
              f"{tokens:,} tokens) in {t1 - t0:.2f}s cold = {len(recs) / (t1 - t0):,.0f} "
              f"records/s, {tokens / (t1 - t0):,.0f} tokens/s (CPU time {c1 - c0:.2f}s, all "
              f"threads); segments() alone, warm: {t2 - t1:.2f}s")
    assert len(out) == len(recs)
