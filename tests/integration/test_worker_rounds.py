"""A testnet worker reports its nodes' rounds when they matter (the ``rounds`` control command).

Two real learning nodes in this process (digits-mlp, loopback, Noise) behind a
real :class:`~murmur.testnet.worker.Worker` control socket: the controller's
long poll is answered the moment a node reaches the round the next churn event
names, not before and not at the next status poll, and a worker that stops
answers what it holds at once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from murmur.testnet.controller import send_control
from murmur.testnet.worker import Worker
from tests.integration.cluster import Cluster, wait_until

LEARNING = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.num_nodes": 2,
    "learning.rounds": 12,
    "learning.local_steps": 2,
    "learning.round_deadline_s": 2.0,
    "learning.threads": 1,
    "network.neighbours": 1,
}
AHEAD = 3  # rounds past the current one the long poll waits for
HOLD_S = 60.0  # what a request asks to be held for: far longer than any wait below
NO_MOVE_S = 0.3


def rounds_of(cluster: Cluster) -> dict[str, int]:
    return {str(n.peer_id): n.learner.round for n in cluster}


async def test_rounds_long_poll(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path, overrides=LEARNING) as cluster:
        worker = Worker()
        sock = tmp_path / "ctl.sock"
        server = await worker.serve_control(sock)
        try:
            assert await send_control(sock, {"cmd": "rounds"}) == {"ok": True, "rounds": {}}  # not up yet
            worker.bring_up(list(cluster))
            first = await send_control(sock, {"cmd": "rounds"})  # no known rounds: at once
            assert first["ok"] and first["rounds"].keys() == rounds_of(cluster).keys()

            # held while rounds move below from_round; answered as the first node reaches it
            target = max(first["rounds"].values()) + AHEAD
            request = {"cmd": "rounds", "known": first["rounds"], "from_round": target, "wait_s": HOLD_S}
            reply = await send_control(sock, request, timeout_s=HOLD_S)
            assert max(reply["rounds"].values()) == target, (target, reply)
            assert all(r <= target for r in rounds_of(cluster).values())  # and the other is not past it

            # without from_round no move is worth a reply: held for wait_s, even while rounds move
            started = time.monotonic()
            known = (await send_control(sock, {"cmd": "rounds"}))["rounds"]
            quiet = await send_control(sock, {"cmd": "rounds", "known": known, "wait_s": NO_MOVE_S})
            assert quiet["ok"] and time.monotonic() - started >= NO_MOVE_S

            # a worker that stops answers a held request at once
            held = asyncio.ensure_future(send_control(
                sock, {"cmd": "rounds", "known": rounds_of(cluster), "from_round": 10**6, "wait_s": HOLD_S},
                timeout_s=HOLD_S))
            await wait_until(lambda: worker.requests_in_progress == 1, 5.0, "the request held")
            started = time.monotonic()
            await worker.close_clients()
            assert (await held)["ok"] and time.monotonic() - started < 1.0
            assert worker.requests_in_progress == 0
        finally:
            server.close()
