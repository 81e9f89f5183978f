"""What `pip install ./shared/spikecore` (no extras) promises: every module outside spikecore.train and
spikecore.data imports and runs without the `[train]` extra's packages, and every third-party package any
module imports is declared, in the base dependencies or in `[train]`."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

SPIKECORE = Path(__file__).resolve().parents[1]
SRC = SPIKECORE / "src" / "spikecore"
# Import name -> distribution name, where they differ.
DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "pytorch_lightning": "pytorch-lightning",
    "yaml": "pyyaml",
    "PIL": "pillow",
}


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((SPIKECORE / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name for r in project["dependencies"]}
    train = {Requirement(r).name for r in project["optional-dependencies"]["train"]}
    return base, train


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Third-party top-level names imported by a module: at import time, and inside functions (run only
    when called, so they may need an extra)."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    at_import, in_functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        names = {n for n in names if n not in sys.stdlib_module_names and n != "spikecore"}
        (in_functions if id(node) in inside else at_import).update(names)
    return at_import, in_functions


def test_every_import_is_declared():
    """At import time a module outside train/ and data/ needs only the base dependencies; anything any
    module imports is declared somewhere (function-level imports of an extra's package are fine)."""
    base, train = _declared()
    # Looked up lazily where present: torch's own (triton), numba's (llvmlite), Lightning's (fabric), and
    # the test-only peer in the energy module's cross-check.
    optional = {"triton", "llvmlite", "lightning_fabric", "spikingjelly"}
    undeclared = []
    for path in sorted(SRC.rglob("*.py")):
        needs_train = path.relative_to(SRC).parts[0] in ("train", "data")
        at_import, in_functions = _imports(path)
        for name in at_import | in_functions:
            dist = DISTRIBUTION.get(name, name)
            allowed = base | train if (needs_train or name in in_functions) else base
            if dist in allowed or name in optional:
                continue
            where = "in [train] only" if dist in train else "nowhere"
            undeclared.append(f"{path.relative_to(SPIKECORE)} imports {name}, declared {where}")
    assert not undeclared, "\n".join(undeclared)


def test_base_install_imports_and_runs_without_the_train_extra():
    """In a process where the `[train]` packages cannot be imported: every module outside train/ and data/
    imports, and a registered backbone and the energy estimate run."""
    _, train = _declared()
    blocked = sorted({*train, "timm", "pytorch_lightning", "lightning", "lightning_fabric", "sklearn"})
    code = f"""
import importlib, pkgutil, sys
for name in {[b.replace("-", "_") for b in blocked]!r}:
    sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec gives None
import torch, spikecore
for m in pkgutil.walk_packages(spikecore.__path__, "spikecore."):
    if not m.name.startswith(("spikecore.train", "spikecore.data")):
        importlib.import_module(m.name)
from spikecore.models import create_model
from spikecore.energy import estimate
model = create_model("spikformer_4_384", T=2, num_classes=3, embed_dim=32, depth=1, num_heads=2).eval()
x = torch.rand(1, 3, 32, 32)
with torch.no_grad():
    print(tuple(model(x).shape), estimate(model, x).macs > 0)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["(1,", "3)", "True"]
