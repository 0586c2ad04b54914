"""`murmur testnet run`'s checks of its own arguments, before anything starts."""

from __future__ import annotations

import argparse

import pytest

from murmur.testnet import cli as testnet_cli
from murmur.testnet.options import port


def test_a_used_run_dir_is_refused_and_an_empty_or_new_one_taken(tmp_path):
    """A run into an earlier run's directory resumed its nodes from their
    checkpoints and reported the old run's results as new."""
    used = tmp_path / "used"
    (used / "nodes").mkdir(parents=True)
    assert "is not empty" in testnet_cli.unusable_run_dir(used)
    (tmp_path / "empty").mkdir()
    assert testnet_cli.unusable_run_dir(tmp_path / "empty") is None
    assert testnet_cli.unusable_run_dir(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
    (tmp_path / "afile").write_text("x")
    assert "is not empty" in testnet_cli.unusable_run_dir(tmp_path / "afile")
    assert testnet_cli.unusable_run_dir(tmp_path / "afile" / "run") == (
        f"cannot create run directory {tmp_path / 'afile' / 'run'}: Not a directory")


def test_a_used_run_dir_stops_the_command_with_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("x")
    parser = argparse.ArgumentParser()
    testnet_cli.add_run_arguments(parser)
    assert testnet_cli.run_testnet(parser.parse_args(["--out", str(tmp_path), "--no-dashboard"])) == 2
    assert capsys.readouterr().err == (f"murmur: run directory {tmp_path} is not empty (a run there would resume "
                                       "its nodes); pick another --out\n")


@pytest.mark.parametrize("text", ["-1", "70000"])
def test_the_dashboard_port_is_a_port(text):
    """70000 was taken modulo 65536; -1 raised deep in asyncio."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \[0, 65535\]"):
        port(text)
    assert port("0") == 0 and port("65535") == 65535
