"""The direction of dependency: train -> pack.format only (the demo may use pack.offline);
pack never imports train, and never torch or deepspeed (packing runs on machines without them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parent.name
            names.add(f"{base}.{node.module}" if node.module else base)
            names.update(f"{base}.{a.name}" for a in node.names if not node.module)
    return names


def test_pack_never_imports_train_or_torch():
    for f in sorted((ROOT / "pack").rglob("*.py")):
        bad = {m for m in imported_modules(f)
               if m.split(".")[0] in ("train", "torch", "deepspeed", "peft")}
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_train_uses_only_the_format_from_pack():
    # remote: URL -> local cache view; errors/files: shared helpers; tokenize.loading: the
    # tokenizer a dataset names (checks compare it with the model's)
    allowed = {"pack", "pack.format", "pack.remote", "pack.errors", "pack.files",
               "pack.tokenize", "pack.tokenize.loading"}
    for f in sorted((ROOT / "train").glob("*.py")):
        extra = {"pack.offline"} if f.name == "demo.py" else set()
        used = {m for m in imported_modules(f) if m == "pack" or m.startswith("pack.")}
        used = {m for m in used if m not in allowed | extra
                and not m.startswith(tuple(f"{a}." for a in allowed | extra if a != "pack"))}
        assert not used, f"train/{f.name} imports {sorted(used)} from pack"
