"""The module map as layers: imports point down only, and no import cycle anywhere in mvc/.

Every `import` / `from ... import` statement of every module counts, function-local ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "mvc"

# Layers, lowest first (docs/architecture.md). A module may import modules of its own layer or below. The config
# stands just above the utilities: the packages publish their choices and rules into mvc.core.registry, and only
# start_stage and the scripts import the config.
UTILITIES = {"mvc.core", "mvc.core.utils", "mvc.core.seeds", "mvc.core.registry", "mvc.core.paths", "mvc.core.schedules",
             "mvc.core.distributed", "mvc.core.perf", "mvc.core.checkpoint"}
CONFIG = {"mvc.core.config", "mvc.core.stage"}
METHOD = {"mvc.data", "mvc.data.dataset", "mvc.data.images", "mvc.data.sources", "mvc.data.captions", "mvc.data.prompts",
          "mvc.data.pairs", "mvc.data.synthetic"}
STAGES = ("classifier", "diffusion", "evaluation", "generation", "studies")  # the packages above, lowest first
# the "low-level" modules: they import no stage and no config
LOW = UTILITIES | METHOD


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def layer(name: str) -> str:
    if name in UTILITIES:
        return "utilities"
    if name in CONFIG:
        return "config"
    if name in METHOD or name.startswith("mvc.data."):
        return "method"
    if name == "mvc":  # the package's face: it imports the packages that publish into the registry
        return "top"
    return name.split(".")[1]  # a stage package (an unknown one has no RANK)


RANK = {"utilities": 0, "config": 1, "method": 2, **{p: 3 + i for i, p in enumerate(STAGES)}, "top": 3 + len(STAGES)}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """mvc modules imported anywhere in `path` (relative imports resolved; `from pkg import mod` -> pkg.mod)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            targets = [node.args[0].value]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports_of(n, p, known) for n, p in mods.items()}


def test_every_module_has_a_layer_and_the_low_layers_are_the_documented_ones():
    mods = set(modules())
    assert LOW <= mods, LOW - mods
    assert all(layer(m) in RANK for m in mods), [m for m in mods if layer(m) not in RANK]
    assert {"mvc.diffusion.finetune", "mvc.diffusion.finetune_loop", "mvc.generation.generate", "mvc.diffusion.tiny", "mvc.classifier.train"} <= mods


def test_imports_point_down_only():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if dep == "mvc":
                continue
            if RANK[layer(dep)] > RANK[layer(mod)]:
                bad.append(f"{mod} ({layer(mod)}) imports {dep} ({layer(dep)})")
    assert not bad, "\n".join(bad)


def test_low_level_modules_import_no_stage_and_no_config():
    g = graph()
    for mod in sorted(LOW | {m for m in g if m.startswith("mvc.data")}):
        stray = {d for d in g[mod] if layer(d) not in ("utilities", "method")}
        assert not stray, f"{mod} imports {stray}"


def test_no_import_cycle():
    g = graph()
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in g}
    stack: list[str] = []

    def visit(n: str) -> None:
        color[n] = GREY
        stack.append(n)
        for d in sorted(g[n]):
            if d == "mvc":
                continue
            if color[d] == GREY:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if color[d] == WHITE:
                visit(d)
        stack.pop()
        color[n] = BLACK

    for n in sorted(g):
        if color[n] == WHITE:
            visit(n)


def test_the_cycle_check_sees_function_local_imports(tmp_path):
    """The walker is not blind to the imports that hide in functions (the ones that made the old cycles)."""
    (tmp_path / "a.py").write_text("def f():\n    from mvc.core.config import Config\n")
    assert imports_of("mvc.x", tmp_path / "a.py", {"mvc.core.config"}) == {"mvc.core.config"}
    (tmp_path / "b.py").write_text("import importlib\nm = importlib.import_module('mvc.generation.generate')\n")
    assert imports_of("mvc.x", tmp_path / "b.py", {"mvc.generation.generate"}) == {"mvc.generation.generate"}


def test_scripts_are_installed_as_commands():
    """`pip install .` installs each stage script as a module and a console command (no sys.path tricks)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = meta["project"]["scripts"]
    modules_ = meta["tool"]["setuptools"]["py-modules"]
    assert set(modules_) == {"caption_mvc", "train_mvc", "generate_mvc", "train_classifier", "evaluate_synthetic",
                            "run_pipeline"}
    for command, target in scripts.items():  # the repository root is on sys.path: tests/ is a package in it
        mod, _, attr = target.partition(":")
        assert mod in modules_ and (ROOT / f"{mod}.py").is_file(), command
        assert callable(getattr(__import__(mod), attr)), target
    for mod in modules_:
        assert "sys.path" not in (ROOT / f"{mod}.py").read_text(), mod


def test_every_declared_dependency_is_imported():
    """pyproject's dependencies are what the code imports (einops was declared and never used)."""
    import re

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in meta["project"]["dependencies"]}
    module_of = {"scikit-learn": "sklearn", "pillow": "PIL", "pyyaml": "yaml"}
    files = [*PKG.rglob("*.py"), *ROOT.glob("*.py")]
    imported = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
    tops = {m.split(".")[0] for m in imported} | ({"tensorboard"} if "torch.utils.tensorboard" in imported else set())
    # safetensors is the weight format diffusers and transformers read and write for us
    assert "safe_serialization=True" in (PKG / "diffusion" / "models.py").read_text()
    unused = {d for d in declared if module_of.get(d, d) not in tops} - {"safetensors"}
    assert not unused, f"declared but never imported: {sorted(unused)}"
