"""The package layout's contracts: the model core imports no upper floor, and files stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("text", "tasks")  # the floors above the model core
# Floor 1 (the model core); the optional modules are checked once they exist.
CORE = [
    "config",
    "model",
    "moe",
    "rope",
    "attention",
    "cache",
    "stats",
    "notebook",
    "offload",
    "storage",
    "generate",
    "checkpoint",
    "hub",
    "compressed_tensors",
]
OPTIONAL_CORE = ["quant", "memory", "sparse", "distributed", "monitor", "monitor_report"]
MAX_LINES = 500


def core_files() -> list[Path]:
    names = CORE + [n for n in OPTIONAL_CORE if (ROOT / "longctx" / f"{n}.py").exists()]
    return [ROOT / "longctx" / f"{n}.py" for n in names] + sorted((ROOT / "triton_kernels").glob("*.py"))


def module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, imported module) of every import that runs when the module is imported: module
    level, including inside if/try/with blocks, but not inside functions or classes.
    Relative imports keep their dots: ``from .text import x`` gives ".text"."""
    found = []

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                if node.module is None:  # from . import text
                    found.extend((node.lineno, base + a.name) for a in node.names)
                else:
                    found.append((node.lineno, base))
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []))

    visit(tree.body)
    return found


def is_upper(module: str) -> bool:
    """Whether an import names the text or tasks floor (absolute or relative)."""
    parts = module.lstrip(".").split(".")
    if module.startswith("."):
        return parts[0] in UPPER
    return parts[0] == "longctx" and len(parts) > 1 and parts[1] in UPPER


def test_is_upper_recognises_floor_imports():
    assert is_upper(".text.tokenizer") and is_upper(".tasks") and is_upper("longctx.text")
    assert not is_upper(".cache") and not is_upper("longctx.kernels") and not is_upper("textwrap")
    tree = ast.parse("import os\nif x:\n    from .text import a\ndef f():\n    from .tasks import b\n")
    assert module_level_imports(tree) == [(1, "os"), (3, ".text")]


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_imports_no_upper_floor_at_module_level(path):
    """Static check, every core module: no module-level import of longctx.text or longctx.tasks."""
    bad = [f"line {line}: {mod}" for line, mod in module_level_imports(ast.parse(path.read_text())) if is_upper(mod)]
    assert not bad, f"{path.relative_to(ROOT)} imports an upper floor: {bad}"


def test_core_runs_without_loading_text_or_tasks():
    """Runtime check: in a fresh interpreter, import the core, build the tiny model and run a
    forward with a cache; no longctx.text* / longctx.tasks* module may be loaded.

    ``longctx/__init__`` re-exports the public API (text included), so the subprocess stands in
    a bare package object for ``longctx`` (same search path, __init__ not run): the check then
    sees exactly what the core modules themselves import."""
    code = textwrap.dedent(f"""
        import importlib, importlib.util, sys, types
        spec = importlib.util.find_spec("longctx")
        pkg = types.ModuleType("longctx")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["longctx"] = pkg
        for name in {CORE!r} + ["kernels"]:
            importlib.import_module("longctx." + name)
        import torch
        from longctx.config import ModelConfig
        from longctx.generate import prefill
        from longctx.model import Model
        from longctx.offload import OffloadPolicy
        model = Model(ModelConfig.preset("tiny")).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the experts are allocated uninitialised: give every weight a value
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        cache = model.new_cache(offload=OffloadPolicy(segment_tokens=4))
        tokens = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            prefill(model, tokens[:, :9], cache, 4)
            cache.record_attention()
            logits = model(tokens[:, 9:], cache)
        assert logits.shape == (1, 2, model.config.vocab_size) and cache.length == 11
        assert cache.attention_mass().sum() > 0
        upper = sorted(m for m in sys.modules if m.startswith(("longctx.text", "longctx.tasks")))
        assert "longctx.offload" in sys.modules and "longctx.kernels" in sys.modules
        print("UPPER", upper)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "UPPER []" in run.stdout, run.stdout


def python_files() -> list[Path]:
    return sorted(p for d in ("longctx", "triton_kernels") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_file_is_at_most_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES}): split it"
