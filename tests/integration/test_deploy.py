"""deploy/: the container image's entrypoint and health check, and the
systemd unit, run and checked where no container engine is at hand.

No container registry is reachable from this project's CI, so the image
cannot be built here (.ci/run builds it where an engine can). What the
image would run is run instead: the Dockerfile's ENTRYPOINT as a real
process, with the volume path pointed at a temporary dir and the port at
any free one, its HEALTHCHECK command polled until it reports healthy, and
SIGTERM (what `docker stop` sends) ending it with exit 0.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from murmur.node import cli

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
UNIT = ROOT / "deploy" / "murmur.service"
MURMUR_BIN = Path(sys.executable).with_name("murmur")
START_S = 60.0
STOP_S = 15.0


def _instructions(text: str) -> dict[str, str]:
    """The Dockerfile's last instruction of each kind (of the final stage), continuation lines joined."""
    out: dict[str, str] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out[word.upper()] = rest.strip()
    return out


def _exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def _here(argv: list[str], data_dir: Path, volume: str) -> list[str]:
    """The container's command as a process here: our murmur, our data dir, any free port."""
    assert argv[0] == "murmur"
    return [sys.executable, "-m", "murmur.node.cli",
            *[str(data_dir) if a == volume else re.sub(r"/tcp/\d+$", "/tcp/0", a) for a in argv[1:]]]


def test_dockerfile_is_slim_non_root_with_a_volume_and_a_health_check() -> None:
    text = DOCKERFILE.read_text()
    ins = _instructions(text)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M) and "python:3.11-slim" in text
    assert ins["USER"] not in ("root", "0") and "useradd" in text
    volume = _exec_form(ins["VOLUME"])[0]
    entry = _exec_form(ins["ENTRYPOINT"])
    assert entry[:3] == ["murmur", "node", "start"] and entry[entry.index("--data-dir") + 1] == volume
    listen = entry[entry.index("--listen") + 1]
    assert listen.endswith(f"/tcp/{ins['EXPOSE']}")
    health = ins["HEALTHCHECK"].split("CMD", 1)[1].strip()
    assert _exec_form(health) == ["murmur", "node", "health", "--data-dir", volume]
    cli.build_parser().parse_args(entry[1:])  # every flag is one the CLI has
    cli.build_parser().parse_args(_exec_form(health)[1:])


def test_the_images_entrypoint_and_health_check_run_here(tmp_path: Path) -> None:
    ins = _instructions(DOCKERFILE.read_text())
    volume = _exec_form(ins["VOLUME"])[0]
    data_dir = tmp_path / "volume"
    entry = _here(_exec_form(ins["ENTRYPOINT"]), data_dir, volume)
    health = _here(_exec_form(ins["HEALTHCHECK"].split("CMD", 1)[1].strip()), data_dir, volume)

    def healthy() -> subprocess.CompletedProcess[str]:
        return subprocess.run(health, capture_output=True, text=True, timeout=30)

    before = healthy()
    assert before.returncode == 1 and before.stderr.startswith("murmur: ")  # nothing runs yet: unhealthy
    # arguments after the image name are added to the entrypoint's
    node = subprocess.Popen([*entry, "--set", "learning.enabled=false"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_S
        while (check := healthy()).returncode != 0:  # what Docker does every --interval, only faster
            assert node.poll() is None, node.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"never healthy: {check.stderr}"
        assert check.stdout == "healthy\n"
        assert (data_dir / "identity.key").exists() and oct((data_dir).stat().st_mode & 0o777) == "0o700"
        node.send_signal(signal.SIGTERM)  # docker stop
        assert node.wait(STOP_S) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert healthy().returncode == 1


def test_systemd_unit_runs_the_cli_and_verifies(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read(UNIT)
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/murmur") and argv[1:3] == ["node", "start"]
    cli.build_parser().parse_args(argv[1:])
    assert argv[argv.index("--data-dir") + 1] == f"/var/lib/{service['StateDirectory']}"
    assert service["User"] not in ("root", "0") and service["KillSignal"] == "SIGTERM"
    # a bad config, and a trainer whose code keeps failing, are not restarted in a loop
    assert service["RestartPreventExitStatus"].split() == [str(cli.EXIT_CONFIG), str(cli.EXIT_TRAINER)]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze to verify the unit with")
    local = tmp_path / "murmur.service"
    local.write_text(UNIT.read_text().replace(argv[0], str(MURMUR_BIN)))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "murmur.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
