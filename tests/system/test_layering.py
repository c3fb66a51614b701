"""The direction of dependency: train -> pack's format reader (and a few shared helpers) only;
pack never imports train, and never torch or deepspeed (packing runs on machines without them).
No import cycles between the project's modules, and no module reaches into another's private
(underscore) names: what two modules share is public."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pack", "train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved from the file)."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def project_modules() -> dict[str, Path]:
    return {module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) pairs: `import a.b` -> (a.b, None); `from a import b` -> (a, b)."""
    return [(mod, name) for mod, name, _ in bindings(path)]


def bindings(path: Path) -> list[tuple[str, str | None, str]]:
    """(module, name, the local name it is bound to) for every import in the file."""
    out: list[tuple[str, str | None, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, None, a.asname or a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node)
            out.extend((mod, a.name, a.asname or a.name) for a in node.names)
    return out


def imported_modules(path: Path) -> set[str]:
    names = set()
    for mod, name in imports(path):
        names.add(mod)
        if name is not None:
            names.add(f"{mod}.{name}")
    return names


def test_pack_never_imports_train_or_torch():
    for f in sorted((ROOT / "pack").rglob("*.py")):
        bad = {m for m in imported_modules(f)
               if m.split(".")[0] in ("train", "torch", "deepspeed", "peft")}
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_train_uses_only_the_format_from_pack():
    # remote: URL -> local cache view; errors/files/cli_config: shared helpers; tokenize.loading:
    # the tokenizer a dataset names (checks compare it with the model's); reference: the
    # format's reference log-prob sidecars (format 2.1, preference datasets)
    allowed = {"pack", "pack.format", "pack.remote", "pack.errors", "pack.files",
               "pack.cli_config", "pack.tokenize", "pack.tokenize.loading", "pack.reference"}
    for f in sorted((ROOT / "train").glob("*.py")):
        extra = {"pack.offline"} if f.name == "demo.py" else set()
        used = {m for m in imported_modules(f) if m == "pack" or m.startswith("pack.")}
        used = {m for m in used if m not in allowed | extra
                and not m.startswith(tuple(f"{a}." for a in allowed | extra if a != "pack"))}
        assert not used, f"train/{f.name} imports {sorted(used)} from pack"


def _graph() -> dict[str, set[str]]:
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for mod, name in imports(f):
            for target in (f"{mod}.{name}" if name else None, mod):
                if target in mods and target != m:
                    graph[m].add(target)
                    break
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None. Every import
    counts, those inside functions too: a deferred import still ties the two modules together."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # a package importing its own submodules is no cycle
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def private_uses(path: Path, mods: dict[str, Path]) -> list[str]:
    """`from other import _name`, and `other._name` on a module bound by import."""
    me = module_name(path)
    bad = []
    bound: dict[str, str] = {}  # local name -> project module it stands for
    for mod, name, local in bindings(path):
        target = f"{mod}.{name}" if name else mod
        if target in mods:
            if name is not None or "." not in mod:
                bound[local] = target
            continue
        if mod in mods and mod != me and name.startswith("_") and not name.startswith("__"):
            bad.append(f"from {mod} import {name}")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and bound[node.value.id] != me
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{bound[node.value.id]}.{node.attr}")
    return bad


def test_no_imports_of_private_names():
    mods = project_modules()
    for m, f in mods.items():
        bad = private_uses(f, mods)
        assert not bad, f"{f.relative_to(ROOT)} uses private names of other modules: {bad}"
