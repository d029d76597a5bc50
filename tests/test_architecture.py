"""The layering of docs/architecture.md, checked: every import (module level or inside a
function) between the project's packages follows an allowed arrow, and ``import reparam``
loads none of the reporting / testing libraries a training script does not need."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer -> the layers it may import (itself always allowed). Lower layers never import upper ones.
ALLOWED = {
    "reparam.errors": set(),
    "reparam.kernels": {"reparam.errors"},
    "reparam.blocks": {"reparam.errors", "reparam.kernels"},
    "reparam.sgs": {"reparam.errors", "reparam.kernels", "reparam.blocks"},
    "reparam.pgt": {"reparam.errors"},
    "reparam.images": {"reparam.errors"},
    "reparam.adapters": {"reparam.errors", "reparam.kernels", "reparam.blocks", "reparam.sgs"},
    "reparam.convert": {"reparam.errors", "reparam.kernels", "reparam.blocks", "reparam.sgs", "reparam.adapters"},
    "reparam": {"reparam.errors", "reparam.kernels", "reparam.blocks", "reparam.sgs", "reparam.pgt"},
    "verification": {"reparam.errors", "reparam.kernels", "reparam.blocks", "reparam.sgs", "reparam.pgt",
                     "reparam.adapters", "reparam.convert", "reparam.images", "reparam"},
    "benchmarks": {"reparam.errors", "reparam.kernels", "reparam.blocks", "reparam.sgs", "reparam.adapters",
                   "reparam.convert", "reparam.images", "reparam", "verification"},
    # the command line sits on top and may import everything
}
PROJECT = ("reparam", "verification", "benchmarks")


def layer_of(module: str) -> str | None:
    """The most specific key of :data:`ALLOWED` that ``module`` belongs to (None: the CLI or
    a module outside the project)."""
    if module.startswith("reparam.cli") or module == "reparam.__main__":
        return None
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        candidate = ".".join(parts[:depth])
        if candidate in ALLOWED:
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every project module ``path`` imports, with its line (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in PROJECT]


def _sources() -> list[Path]:
    return sorted(p for top in PROJECT for p in (ROOT / top).rglob("*.py") if "results" not in p.parts)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    source = layer_of(module_name(path))
    if source is None:
        return
    wrong = []
    for line, target in imports_of(path):
        target_layer = layer_of(target)
        if target.startswith("reparam.cli"):
            target_layer = "reparam.cli"
        if target_layer in (None, source) or target_layer in ALLOWED[source]:
            continue
        wrong.append(f"line {line}: {target} ({target_layer})")
    assert not wrong, f"{source} may import only {sorted(ALLOWED[source])}; {path.name} imports " + "; ".join(wrong)


def test_import_reparam_loads_no_reporting_libraries():
    """What a training script imports (blocks, attach_sgs, conversion) stays light."""
    heavy = ("pandas", "matplotlib", "hypothesis", "tabulate", "timm", "sklearn", "skimage")
    code = ("import sys, reparam, reparam.convert, reparam.sgs; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "", f"import reparam loaded {done.stdout.strip()}"
