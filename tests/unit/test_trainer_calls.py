"""What a node does when its trainer's own code raises (murmur/node/trainercalls.py):
tried once more, a second failure or a failure in every round is a
TrainerFailed naming the user's line; murmur's own errors are not retried."""

from __future__ import annotations

import logging

import pytest

from murmur.errors import TrainerError, TrainerFailed
from murmur.node.trainercalls import FAILING_ROUNDS_MAX, TRAINER_ATTEMPTS, TrainerCalls

SPEC = "mymod:MyTrainer"


class Script:
    """A trainer call that raises on the calls listed, else returns its count."""

    def __init__(self, failing: set[int], error: Exception | None = None) -> None:
        self.failing, self.error, self.calls = failing, error, 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls in self.failing:
            raise self.error or ValueError(f"shape bug on call {self.calls}")  # the user's line
        return self.calls


async def test_a_single_failure_is_tried_once_more(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="murmur.node.trainercalls")
    script = Script({1})
    assert await TrainerCalls(SPEC).call("train", 4, script) == 2
    [record] = caplog.records
    assert record.getMessage().startswith(f"trainer '{SPEC}' raised in train() at round 4: ValueError: shape bug "
                                          f"on call 1 (at {__file__}:")
    assert record.getMessage().endswith(" in __call__); trying once more")


async def test_a_second_failure_in_a_row_is_a_trainer_failed_naming_the_users_line() -> None:
    script = Script({1, 2})
    with pytest.raises(TrainerFailed) as err:
        await TrainerCalls(SPEC).call("evaluate", 7, script)
    assert script.calls == TRAINER_ATTEMPTS
    assert str(err.value).startswith(f"trainer '{SPEC}' raised in evaluate() at round 7: ValueError: shape bug on "
                                     f"call 2 (at {__file__}:")
    assert isinstance(err.value.__cause__, ValueError)
    assert isinstance(err.value, TrainerError)  # what the daemon stops with exit 3 for


async def test_a_failure_in_every_round_ends_the_rounds_though_each_retry_passes() -> None:
    """A bug that hits one batch of every round passed every retry and logged
    an error a round for ever."""
    calls = TrainerCalls(SPEC)
    script = Script({1, 3, 5, 7, 9})  # each round's first try fails, its second passes
    for round_ in range(FAILING_ROUNDS_MAX - 1):
        await calls.call("train", round_, script)
    with pytest.raises(TrainerFailed, match=rf"raised in {FAILING_ROUNDS_MAX} rounds in a row, passing only when "
                                            r"tried again\)$") as err:
        await calls.call("train", FAILING_ROUNDS_MAX - 1, script)
    assert isinstance(err.value.__cause__, ValueError)


async def test_a_round_without_failure_resets_the_count() -> None:
    calls = TrainerCalls(SPEC)
    script = Script({1, 3, 6, 8})  # fail, fail, clean, fail, fail: never three in a row
    for round_ in range(5):
        await calls.call("train", round_, script)


async def test_murmurs_own_error_is_raised_as_it_is() -> None:
    """A broken contract (CheckedTrainer's TrainerError) is not the user's
    transient failure: retrying it would only repeat it."""
    script = Script({1}, TrainerError("MyTrainer.train() returned dict, expected TrainStats"))
    with pytest.raises(TrainerError, match=r"^MyTrainer.train\(\) returned dict"):
        await TrainerCalls(SPEC).call("train", 0, script)
    assert script.calls == 1


INSTALLED = '''
import json


class Installed:
    def train(self):
        return json.loads("{")  # the user's bug, raised inside the standard library
'''


def test_an_installed_trainers_own_line_is_named(tmp_path, monkeypatch) -> None:
    """A trainer pip-installed into the node's environment: every frame is an
    installed package's, and its error was reported at the innermost frame of
    all (torch's linear.py:134 for a shape bug of its own), not at its line."""
    import sysconfig

    from murmur.node.trainercalls import trainer_failed

    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "fh_installed.py").write_text(INSTALLED, encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    paths = {**sysconfig.get_paths(), "purelib": str(site), "platlib": str(site)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda *args, **kwargs: paths)
    import fh_installed

    try:
        fh_installed.Installed().train()
    except ValueError as exc:
        error = exc
    named = str(trainer_failed(SPEC, "train", 0, error, fh_installed.Installed))
    assert named.endswith(f"(at {site / 'fh_installed.py'}:7 in train)"), named
    assert "fh_installed.py" not in str(trainer_failed(SPEC, "train", 0, error))  # without the class
