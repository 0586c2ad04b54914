"""The package's dependencies point one way (docs/ARCHITECTURE.md):
testnet -> node -> learning, protocol; protocol knows nothing of torch,
learning nothing of the daemon. Read off every module's imports, lazy ones
inside functions included, so a shortcut taken in a hurry fails here and
not in a review months later."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "murmur"

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "protocol": ("murmur.learning", "murmur.node", "murmur.testnet", "torch"),
    "learning": ("murmur.node", "murmur.testnet"),
    "node": ("murmur.testnet",),
}
ALLOWED = {
    # The `murmur` command has a `testnet run` subcommand: its parser takes the
    # options the testnet declares once, a module that imports nothing else.
    ("node/cli.py", "murmur.testnet.options"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def violations(layer: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        for module in imports_of(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]) and (name, module) not in ALLOWED:
                out.append((name, module))
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_against_the_dependency_direction(layer: str) -> None:
    assert violations(layer) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from murmur.node.config import NodeConfig\n    import torch.nn\n")
    assert imports_of(module) == {"murmur.node.config", "torch.nn"}


HEAVY = ("torch", "scipy", "cvxpy")


def test_the_config_and_the_command_line_load_without_torch_or_scipy() -> None:
    """`murmur id`, `murmur config check` and `--help` load the config and the
    command line only: torch, scipy and cvxpy cost seconds, so the config's
    privacy vocabulary lives apart from the maths (learning/privacy/schemes.py).
    A fresh interpreter, so what this test run imported does not count."""
    code = ("import sys, murmur.node.config, murmur.node.cli; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""
