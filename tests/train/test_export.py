"""train.export: DeepSpeed checkpoints of every ZeRO stage -> Hugging Face dirs that reload exactly.

Fast tests make their checkpoints in ONE subprocess (world size 1, DeepSpeed engines of ZeRO 0/2/3,
full and LoRA, `stage3_param_persistence_threshold: 0` so ZeRO-3 really partitions), laid out as
train-run lays out OUTPUT. That process also records each engine's loss on a fixed batch after
training; the exported model reloaded with `from_pretrained` must give the same loss.
Slow tests go through the real `train-run` (2 ranks) once it exists.

Run `python tests/train/test_export.py make OUT TOKENIZER_DIR` to make the checkpoints by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# name: (zero stage, lora, dtype, tied embeddings)
CASES = {
    "z0": (0, False, "fp32", False),
    "z2": (2, False, "fp32", False),
    "z3": (3, False, "fp32", False),
    "z3-tied": (3, False, "fp32", True),
    "z0-lora": (0, True, "fp32", False),
    "z2-lora": (2, True, "fp32", False),
    "z3-lora": (3, True, "fp32", False),
    "z0-bf16": (0, False, "bf16", False),
    "z2-bf16": (2, False, "bf16", False),  # DeepSpeed names these bf16_zero_*_optim_states.pt
    "z3-bf16": (3, False, "bf16", False),
}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
            lora_dropout=0.0)
SEQ = 24


def fixed_batch(vocab: int, seed: int = 1):
    """Two packed samples in one row, as train-run feeds them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 5000), (1, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 0] = labels[0, 10] = -100
    pos = torch.cat([torch.arange(10), torch.arange(SEQ - 10)]).unsqueeze(0)
    return dict(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)


def loss_of(model, vocab: int) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float(model(**fixed_batch(vocab)).loss)


def make_checkpoints(out: Path, tokenizer_dir: Path, names: list[str]) -> None:
    """(Subprocess body.) One OUTPUT directory per case under `out`, plus `out/base` (the
    starting model) and `out/ref.json` (each engine's loss on fixed_batch after training)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.tiny import copy_tokenizer_files, make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    ref = {}
    for name in names:
        stage, lora, dtype, tied = CASES[name]
        base = out / f"base-{'tied' if tied else 'untied'}"
        if not base.exists():
            make_tiny_model("qwen3", tokenizer_dir, base, hidden=32, layers=2, heads=4,
                            kv_heads=2, tie_word_embeddings=tied, seed=3)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        vocab = model.config.vocab_size
        run = out / name
        (run / "model_config").mkdir(parents=True, exist_ok=True)
        shutil.copy2(base / "config.json", run / "model_config" / "config.json")
        shutil.copy2(base / "generation_config.json", run / "model_config")
        copy_tokenizer_files(base, run / "model_config")
        if lora:
            model = get_peft_model(model, LoraConfig(**LORA))
            (run / "model_config" / "lora.json").write_text(
                json.dumps(model.peft_config["default"].to_dict(), default=sorted, indent=1))
        (run / "run.json").write_text(json.dumps({"args": {"model": str(base)},
                                                  "world_size": 1}))
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
               "bf16": {"enabled": dtype == "bf16"}, "steps_per_print": 10 ** 9}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-2)
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        torch.manual_seed(0)
        for step in range(3):
            batch = fixed_batch(vocab, seed=10 + step)
            loss = eng(**batch).loss
            eng.backward(loss)
            eng.step()
        eng.save_checkpoint(str(run / "checkpoints"), tag="step-00000003")
        (run / "checkpoints" / "step-00000003" / "packtrain_state.json").write_text(
            json.dumps({"step": 3}))
        eng.module.eval()
        with torch.no_grad():
            ref[name] = float(eng(**fixed_batch(vocab)).loss)
        del eng, opt, model
    (out / "ref.json").write_text(json.dumps(ref, indent=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_maker(out: Path, tokenizer_dir: Path, names: list[str]) -> dict:
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, "make", str(out), str(tokenizer_dir),
                        *names], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise AssertionError(f"checkpoint maker failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return json.loads((out / "ref.json").read_text())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("ckpts")
    ref = run_maker(out, tokenizer_dir, list(CASES))
    return out, ref


def _reload(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


# ---------------------------------------------------------------- full models

@pytest.mark.parametrize("name", ["z0", "z2", "z3", "z3-tied"])
def test_full_round_trip(ckpts, tmp_path, name):
    from train.export import EXPORT_INFO, export_checkpoint

    out, ref = ckpts
    exp = export_checkpoint(out / name, tmp_path / "export")
    assert (exp / "model.safetensors").is_file()
    assert (exp / "tokenizer.json").is_file() and (exp / "tokenizer_config.json").is_file()
    assert not list(exp.glob("*.bin")) and not list(exp.glob("*.pt"))
    info = json.loads((exp / EXPORT_INFO).read_text())
    assert info["kind"] == "full" and info["tag"] == "step-00000003" and info["step"] == 3
    model = _reload(exp)
    vocab = model.config.vocab_size
    assert loss_of(model, vocab) == pytest.approx(ref[name], abs=2e-5, rel=1e-5)
    # training moved the weights: the export is not the starting model
    base = _reload(out / ("base-tied" if "tied" in name else "base-untied"))
    assert abs(loss_of(base, vocab) - ref[name]) > 1e-3
    if "tied" in name:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_every_load_is_weights_only(ckpts, tmp_path, monkeypatch):
    """DeepSpeed's zero_to_fp32 hard-codes torch.load(weights_only=False); export must never
    let a full unpickling load through."""
    import torch

    from train.export import export_checkpoint

    out, _ = ckpts
    real, calls = torch.load, []

    def guarded(*a, **k):
        calls.append(k.get("weights_only"))
        assert k.get("weights_only") is True, "unsafe torch.load"
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", guarded)
    for name in ("z0", "z2", "z3-lora", "z0-bf16"):
        export_checkpoint(out / name, tmp_path / name)
    assert calls and all(calls)


def test_checkpoint_forms_equal(ckpts, tmp_path):
    """OUTPUT, OUTPUT/checkpoints and the tag dir export the same weights."""
    from safetensors.torch import load_file

    from train.export import export_checkpoint

    out, _ = ckpts
    a = export_checkpoint(out / "z2", tmp_path / "a")
    b = export_checkpoint(out / "z2" / "checkpoints", tmp_path / "b")
    c = export_checkpoint(out / "z2" / "checkpoints" / "step-00000003", tmp_path / "c")
    sa, sb, sc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert sa.keys() == sb.keys() == sc.keys()
    assert all((sa[k] == sb[k]).all() and (sa[k] == sc[k]).all() for k in sa)


@pytest.mark.parametrize("name", ["z0-bf16", "z2-bf16", "z3-bf16"])
def test_bf16_exports_fp32_masters(ckpts, tmp_path, name):
    import torch
    from safetensors.torch import load_file

    from train.export import export_checkpoint, safe_load

    out, _ = ckpts
    exp = export_checkpoint(out / name, tmp_path / "e", dtype="float32")
    got = load_file(str(exp / "model.safetensors"))
    assert all(got[k].dtype == torch.float32 for k in got)
    # the masters carry more than bf16 precision: not just the bf16 weights upcast
    assert any(not torch.equal(got[k], got[k].to(torch.bfloat16).float()) for k in got)
    assert json.loads((exp / "packtrain_export.json").read_text())["warnings"] == []
    if name != "z3-bf16":  # ZeRO-3 keeps no whole module in model_states
        module = safe_load(out / name / "checkpoints/step-00000003/mp_rank_00_model_states.pt")["module"]
        assert all(torch.equal(got[k].to(torch.bfloat16), module[k]) for k in got)
    if name != "z0-bf16":
        return
    # default dtype follows the original config (float32 here)
    exp2 = export_checkpoint(out / "z0-bf16", tmp_path / "e2")
    assert load_file(str(exp2 / "model.safetensors"))["lm_head.weight"].dtype == torch.float32
    exp3 = export_checkpoint(out / "z0-bf16", tmp_path / "e3", dtype="bfloat16")
    assert load_file(str(exp3 / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((exp3 / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------- LoRA

@pytest.mark.parametrize("name", ["z0-lora", "z2-lora", "z3-lora"])
def test_lora_adapter_and_merged(ckpts, tmp_path, name):
    from peft import PeftModel
    from safetensors.torch import load_file

    from train.export import export_checkpoint

    out, ref = ckpts
    base_dir = out / "base-untied"
    adapter = export_checkpoint(out / name, tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # ZeRO-3 empty-tensor trap
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())
    assert (adapter / "tokenizer.json").is_file()

    model = PeftModel.from_pretrained(_reload(base_dir), str(adapter))
    vocab = model.config.vocab_size
    assert loss_of(model, vocab) == pytest.approx(ref[name], abs=2e-5, rel=1e-5)

    merged = export_checkpoint(out / name, tmp_path / "merged", merge=True)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    m = _reload(merged)
    assert not any("lora" in k for k in m.state_dict())
    assert loss_of(m, vocab) == pytest.approx(ref[name], abs=1e-4, rel=1e-4)


def test_export_inside_a_live_zero3_training_process(ckpts, tmp_path):
    """train-run exports on rank 0 while its HfDeepSpeedConfig (ZeRO-3) is alive: the export
    must not build its model under deepspeed.zero.Init (a collective only rank 0 joins hangs)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from train.export import export_checkpoint

    out, ref = ckpts
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1,
                              "zero_optimization": {"stage": 3}})
    try:
        assert is_deepspeed_zero3_enabled()
        exp = export_checkpoint(out / "z3-lora", tmp_path / "e", merge=True)
        assert is_deepspeed_zero3_enabled()  # restored for the trainer
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
        del keep
    m = _reload(exp)
    assert loss_of(m, m.config.vocab_size) == pytest.approx(ref["z3-lora"], abs=1e-4, rel=1e-4)


# ---------------------------------------------------------------- failures

def test_half_written_export_leaves_no_final_dir(ckpts, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from train.export import export_checkpoint

    out, _ = ckpts

    def boom(self, *a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(out / "z0", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert list(tmp_path.iterdir()) == []  # no tmp dir left either


def test_killed_export_leftovers_removed(ckpts, tmp_path):
    from train.export import export_checkpoint

    out, _ = ckpts
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"export.tmp-{dead}"  # what a SIGKILLed export leaves: never "export"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / ".packtrain-export-partial").write_text(f"{dead}\n")
    live = tmp_path / f"export.tmp-{os.getpid()}x"  # not ours to judge: left alone
    live.mkdir()
    export_checkpoint(out / "z0", tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])


def test_user_folders_named_like_leftovers_survive(ckpts, tmp_path):
    """Only directories carrying the export's own marker (with the PID in their name) are
    removed; a user's sib/hf.old-2024 or a dead-PID-named folder of theirs is never touched."""
    from train.export import export_checkpoint

    out, _ = ckpts
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    users = ["hf.old-2024", f"hf.tmp-{dead}", f"hf.old-{dead}"]
    for name in users:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    wrong_pid = tmp_path / "hf.old-1"  # a marker naming another PID than the folder's name
    wrong_pid.mkdir()
    (wrong_pid / ".packtrain-export-partial").write_text(f"{dead}\n")
    export_checkpoint(out / "z0", tmp_path / "hf")
    export_checkpoint(out / "z0", tmp_path / "hf")  # a re-export goes through hf.old-PID too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", "hf.old-1", *users])
    for name in users:
        assert (tmp_path / name / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "hf" / ".packtrain-export-partial").exists()


def test_failed_reexport_keeps_previous(ckpts, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from train.export import export_checkpoint

    out, _ = ckpts
    exp = export_checkpoint(out / "z0", tmp_path / "export")
    before = sorted(p.name for p in exp.iterdir())
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        export_checkpoint(out / "z0", exp)
    assert sorted(p.name for p in exp.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_errors_are_one_line(ckpts, tmp_path):
    from pack.errors import PacktrainError
    from train.export import export_checkpoint

    out, _ = ckpts
    cases = []
    with pytest.raises(PacktrainError, match="no such checkpoint") as e:
        export_checkpoint(tmp_path / "nope", tmp_path / "x")
    cases.append(e)
    run = tmp_path / "run"
    shutil.copytree(out / "z0", run)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(PacktrainError, match="latest: missing") as e:
        export_checkpoint(run, tmp_path / "x")
    cases.append(e)
    (run / "checkpoints" / "latest").write_text("step-00000099")
    with pytest.raises(PacktrainError, match="does not exist") as e:
        export_checkpoint(run, tmp_path / "x")
    cases.append(e)
    (run / "checkpoints" / "latest").write_text("step-00000003")
    shutil.rmtree(run / "model_config")
    with pytest.raises(PacktrainError, match="model_config") as e:
        export_checkpoint(run, tmp_path / "x")
    cases.append(e)
    with pytest.raises(PacktrainError, match="not a floating-point torch dtype") as e:
        export_checkpoint(out / "z0", tmp_path / "x", dtype="int8")
    cases.append(e)
    with pytest.raises(PacktrainError, match="only to LoRA runs") as e:
        export_checkpoint(out / "z0", tmp_path / "x", merge=True)
    cases.append(e)
    # a model dir that is not an export is never overwritten
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    with pytest.raises(PacktrainError, match="not a packtrain export") as e:
        export_checkpoint(out / "z0", keep)
    cases.append(e)
    assert (keep / "precious.txt").is_file()
    for e in cases:
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_mismatched_config_refused(ckpts, tmp_path):
    from pack.errors import PacktrainError
    from train.export import export_checkpoint

    out, _ = ckpts
    run = tmp_path / "run"
    shutil.copytree(out / "z3", run)
    cfg = json.loads((run / "model_config" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["layer_types"] = cfg["layer_types"] + cfg["layer_types"][:1]
    (run / "model_config" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PacktrainError, match=r"does not match model_config.*missing"):
        export_checkpoint(run, tmp_path / "x")
    cfg["num_hidden_layers"] = 2
    cfg["layer_types"] = cfg["layer_types"][:2]
    cfg["intermediate_size"] = 64
    (run / "model_config" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PacktrainError, match="has shape"):
        export_checkpoint(run, tmp_path / "x")
    cfg["intermediate_size"] = 128
    cfg["tie_word_embeddings"] = True  # untied checkpoint, tied config: never silently pick one
    (run / "model_config" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PacktrainError, match="tied"):
        export_checkpoint(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_truncated_checkpoint_refused(ckpts, tmp_path):
    from pack.errors import PacktrainError
    from train.export import export_checkpoint

    out, _ = ckpts
    run = tmp_path / "run"
    shutil.copytree(out / "z2", run)
    f = run / "checkpoints/step-00000003/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(PacktrainError, match="weights-only torch file"):
        export_checkpoint(run, tmp_path / "x")


def test_export_main_cli(ckpts, tmp_path, capsys):
    from train.export import export_main

    out, _ = ckpts
    assert export_main([str(out / "z0"), str(tmp_path / "e")]) == 0
    assert "exported full" in capsys.readouterr().out
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "e2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("train-export: error:") and err.count("\n") == 1


# ---------------------------------------------------------------- through train-run (2 ranks)

def _have_trainer() -> bool:
    return (ROOT / "train" / "cli.py").is_file() and (ROOT / "train" / "loop.py").is_file()


@pytest.fixture(scope="module")
def trainer_inputs(tmp_path_factory, tokenizer_dir, chat_jsonl):
    if not _have_trainer():
        pytest.skip("train-run (train/cli.py, train/loop.py) is not in this tree yet")
    from pack.cli import build_main
    from train.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("trainer")
    assert build_main([str(chat_jsonl), str(root / "packed"), "--tokenizer", str(tokenizer_dir),
                       "--max-length", "256", "--quiet", "--workers", "1"]) == 0
    make_tiny_model("qwen3", tokenizer_dir, root / "model", hidden=32, layers=2, heads=4,
                    kv_heads=2, seed=5)
    (root / "ds.json").write_text(json.dumps(
        {"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("zero,lora", [(2, False), (3, False), (2, True), (3, True)],
                         ids=["z2", "z3", "z2-lora", "z3-lora"])
def test_train_run_export_reproduces_logged_loss(trainer_inputs, tmp_path, zero, lora):
    """2 ranks through train-run: export the step-2 checkpoint and score the packs step 3
    trained on; the loss the trainer logged at step 3 (before its update) must come back.
    LoRA: the adapter on the base via PeftModel.from_pretrained, and the merged model."""
    from peft import PeftModel

    from pack.format import PackedDataset
    from train.demo import _last_step_packs, pack_loss
    from train.export import export_checkpoint

    root = trainer_inputs
    run, debug = tmp_path / "run", tmp_path / "debug"
    cmd = [sys.executable, "-m", "train.cli", "--shards", str(root / "packed"), "--model",
           str(root / "model"), "--zero", str(zero), "--nproc", "2", "--max-steps", "3",
           "--save-every", "2", "--lr", "1e-3", "--schedule", "constant", "--output", str(run),
           "--deepspeed", str(root / "ds.json")]
    if lora:
        cmd += ["--lora", "--lora-r", "4", "--lora-dropout", "0", "--lora-targets",
                "q_proj,v_proj"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PACKTRAIN_DEBUG_PACKS=str(debug)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    logged = metrics[-1]["loss"]
    packs = _last_step_packs(debug, 3)
    assert packs and len(packs) == 2  # one pack per rank
    ds = PackedDataset(root / "packed")

    exp = export_checkpoint(run / "checkpoints" / "step-00000002", tmp_path / "e2")
    if lora:
        base = _reload(root / "model")
        assert json.loads((exp / "adapter_config.json").read_text())[
            "base_model_name_or_path"] == str((root / "model").resolve())
        model = PeftModel.from_pretrained(base, str(exp))
    else:
        model = _reload(exp)
    assert pack_loss(model, ds, packs) == pytest.approx(logged, abs=1e-4, rel=1e-5)
    if lora:
        merged = export_checkpoint(run / "checkpoints" / "step-00000002", tmp_path / "m2",
                                   merge=True)
        assert pack_loss(_reload(merged), ds, packs) == pytest.approx(logged, abs=2e-4, rel=2e-5)
    # train-run --export wrote the final step's model, and it is not the step-2 one
    final = run / "export"
    assert json.loads((final / "packtrain_export.json").read_text())["tag"] == "step-00000003"
    if lora:
        final_model = PeftModel.from_pretrained(_reload(root / "model"), str(final))
    else:
        final_model = _reload(final)
    assert abs(pack_loss(final_model, ds, packs) - logged) > 1e-4


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "make":
        make_checkpoints(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:] or list(CASES))
    else:
        print(__doc__)
