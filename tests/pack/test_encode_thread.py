"""pack.tokenize.encode_thread: tokenizer calls run on one other thread per process, forks included."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from pack.tokenize import encode_thread


def _thread_name() -> str:
    return threading.current_thread().name


def test_runs_off_the_main_thread_and_returns_the_result():
    assert threading.current_thread() is threading.main_thread()
    name = encode_thread.call(_thread_name)
    assert name != threading.main_thread().name and name.startswith("packtrain-encode")
    assert encode_thread.call(_thread_name) == name  # one long-lived thread, not one per call
    assert encode_thread.call(lambda a, b=0: a + b, 2, b=3) == 5


def test_exceptions_come_back_with_their_type():
    def bad():
        raise UnicodeError("lone surrogate")

    with pytest.raises(UnicodeError, match="lone surrogate"):
        encode_thread.call(bad)
    assert encode_thread.call(lambda: 7) == 7  # the thread survived


def test_from_another_thread_it_runs_in_place():
    got = []
    t = threading.Thread(target=lambda: got.append(encode_thread.call(_thread_name)),
                         name="some-caller")
    t.start()
    t.join()
    assert got == ["some-caller"]


def _child(q) -> None:
    q.put(encode_thread.call(_thread_name))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_gets_its_own_thread():
    parent_ident = encode_thread.call(lambda: threading.current_thread().ident)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    name = q.get(timeout=60)  # the parent's thread does not exist there: no hang
    p.join(60)
    assert p.exitcode == 0
    assert name.startswith("packtrain-encode")
    assert encode_thread.call(lambda: threading.current_thread().ident) == parent_ident


def test_the_renderer_tokenizes_on_the_encode_thread(tokenizer_dir, monkeypatch):
    from pack.tokenize.loading import load_tokenizer
    from pack.templates import Renderer

    tok = load_tokenizer(tokenizer_dir)
    r = Renderer(tok, "alpaca", None)
    seen = []
    real = r.encoder.backend.encode_batch_fast

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(r.encoder, "backend", type("B", (), {"encode_batch_fast": staticmethod(spy)}))
    out = r.encode_batch([{"instruction": "Say hi.", "input": "", "output": "Hi!"}])
    assert seen and all(n.startswith("packtrain-encode") for n in seen)
    ids, labels = out[0]
    assert len(ids) == len(labels) > 0
