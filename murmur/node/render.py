"""``murmur status`` and ``murmur peers`` for a person at a terminal.

The JSON the API serves is the contract (ARCHITECTURE.md) and what
``--output json`` prints; this is the same content laid out to be read:
labelled lines, units (MiB, seconds), ε next to its budget, rounds next to
their target. Missing fields print as ``–``: an older or a relay-only node
answers with less, never makes this fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from murmur.learning.privacy.outlook import outweighs
from murmur.node.progress import Progress
from murmur.node.stalls import HELD_BACK_STREAK
from murmur.units import fmt_bytes, fmt_number, fmt_seconds

LABEL_WIDTH = 13
SHORT_PEER = 16  # characters of a peer id in a table; the full id is in --output json
MURMUR_PROTOCOL_PREFIX = "/murmur/"  # murmur's protocol ids (protocol.messages.MurmurProtocol)


def _line(label: str, value: str) -> str:
    return f"{label:<{LABEL_WIDTH}}{value}"


def _rounds(learning: Mapping[str, Any]) -> str:
    target = learning.get("target_rounds")
    of = f" of {target}" if target is not None else " (until stopped)"
    state = learning.get("state")
    if state == Progress.STOPPED:  # kept serving after the rounds crashed: say so, and why, not "training"
        return f"{fmt_number(learning.get('round'))}{of}, STOPPED: {learning.get('stopped_reason') or 'crashed'}"
    return f"{fmt_number(learning.get('round'))}{of}" + (f", {state}" if state else "")


def _privacy(learning: Mapping[str, Any]) -> str | None:
    budget = learning.get("epsilon_budget")
    if budget is None:
        return None
    spent = learning.get("epsilon_spent", learning.get("epsilon"))
    delta = learning.get("delta")
    text = f"ε spent {fmt_number(spent, 2)} of budget {fmt_number(budget, 2)}"
    text += f" (δ = {delta:g})" if isinstance(delta, (int, float)) else ""
    stage = learning.get("privacy") or {}
    rho = stage.get("noise_to_signal")
    if isinstance(rho, (int, float)):
        text += f", noise-to-signal {rho:.2g}" + (" (the noise outweighs the learning: see the log)" if outweighs(rho) else "")
    fallbacks, sent = stage.get("fallback_rounds"), stage.get("rounds_sent")
    if fallbacks:
        text += f", {fallbacks} of {sent} rounds with fallback noise (too few edges)"
    edgeless = stage.get("neighbours_without_edge")
    if edgeless:
        text += f", {edgeless} neighbours without a noise edge (they run no privacy)"
    against = stage.get("epsilon_against")
    if isinstance(against, Mapping) and against:
        holds = stage.get("colluders") or 0
        text += (f"; ε of the run against colluding nodes (the budget holds against {holds}): "
                 + ", ".join(f"{fmt_number(eps, 1)} with {k}" for k, eps in against.items()))
    return text


def _phases(learning: Mapping[str, Any]) -> str | None:
    phases = learning.get("last_round_s") or {}
    if not phases:
        return None
    total = sum(float(v) for v in phases.values())
    parts = ", ".join(f"{name} {fmt_seconds(float(v))}" for name, v in phases.items())
    return f"{fmt_seconds(total)} ({parts})"


def _reachability(reach: Mapping[str, Any]) -> str:
    """``private (interfaces)``: the state and what it rests on, with the
    NAT's public side once peers confirmed it (an address peers saw, not
    proof that they can dial it)."""
    text = f"{reach.get('state', '–')} ({reach.get('basis', '–')})"
    observed = reach.get("observed") or []
    return text + (f"; peers see it at {', '.join(str(a) for a in observed)}" if observed else "")


def _incompatible(status: Mapping[str, Any]) -> str | None:
    """Peers this node will not learn with, and the latest one's reason."""
    incompatible = status.get("incompatible") or {}
    if not incompatible.get("peers"):
        return None
    peer = str(incompatible.get("peer", "–"))[:SHORT_PEER] + "…"
    return f"{incompatible['peers']} peers not learned with; latest {peer}: {incompatible.get('reason', '–')}"


def _alone(status: Mapping[str, Any], learning: Mapping[str, Any]) -> str | None:
    """Why a node that has run rounds has no learning neighbour, if it has none:
    without a neighbour it trains on its own data only, and looks busy."""
    if status.get("neighbours") or not learning.get("round") or learning.get("done"):
        return None
    if (status.get("incompatible") or {}).get("peers"):
        return "no learning neighbour: the peers it met run another model or no murmur (see incompatible)"
    if not status.get("connections"):
        return "no learning neighbour: no peer connected (network.bootstrap; can peers reach this node?)"
    return f"no learning neighbour among {fmt_number(status.get('connections'))} connected peers yet"


def render_status(status: Mapping[str, Any]) -> str:
    health = status.get("health") or {}
    failed = health.get("failed_tasks") or []
    lines = [
        _line("peer", str(status.get("peer_id", "–"))),
        *(_line("address" if i == 0 else "", str(a)) for i, a in enumerate(status.get("addrs") or [])),
        _line("reachability", _reachability(status.get("reachability") or {})),
        _line("agent", str(status.get("agent", "–"))),
        _line("uptime", fmt_seconds(status.get("uptime_s"))),
        _line("health", "ok" if health.get("ok", True) and not failed else
              "UNHEALTHY: " + "; ".join(f"{f.get('task')} {f.get('state')}: {f.get('error')}" for f in failed)),
        _line("connections", f"{fmt_number(status.get('connections'))} "
                             f"({len(status.get('neighbours') or [])} learning neighbours)"),
        _line("traffic", f"in {fmt_bytes(status.get('bytes_in'))}, out {fmt_bytes(status.get('bytes_out'))}"),
    ]
    faults = status.get("faults") or {}
    if faults:
        lines.append(_line("peer faults", ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))))
    incompatible = _incompatible(status)
    if incompatible is not None:
        lines.append(_line("incompatible", incompatible))
    learning = status.get("learning")
    if not learning:
        lines.append(_line("learning", f"off ({status.get('learning_off') or 'no learner'})"))
        return "\n".join(lines) + "\n"
    lines.append(_line("rounds", _rounds(learning)))
    accuracy = fmt_number(learning.get("accuracy"))
    if learning.get("evaluated_round") is not None:
        accuracy += f" (recorded at round {learning['evaluated_round']}, before the restart)"
    lines.append(_line("accuracy", accuracy))
    lines.append(_line("loss", fmt_number(learning.get("loss"))))
    lines.append(_line("aggregator", str(learning.get("aggregator") or "–")))
    if learning.get("attack_rate") is not None:
        lines.append(_line("attack rate", fmt_number(learning.get("attack_rate"))))
    for label, text in (("privacy", _privacy(learning)), ("last round", _phases(learning))):
        if text is not None:
            lines.append(_line(label, text))
    if learning.get("stalled"):
        lines.append(_line("STALLED", str(learning.get("stall_reason") or "")))
    diverged = int(learning.get("rounds_diverged") or 0)
    if diverged:
        lines.append(_line("DIVERGED", f"local training gave a non-finite step in the last {diverged} rounds; each "
                                       "was skipped, so the node only averages its neighbours' models: lower the "
                                       "learning rate (learning.trainer_options.lr)"))
    alone = _alone(status, learning)
    if alone is not None:
        lines.append(_line("ALONE", alone))
    held = int(learning.get("rounds_held_back") or 0)
    if held >= HELD_BACK_STREAK:
        lines.append(_line("HELD BACK", f"{held} rounds behind neighbours it never gave weight, which it does "
                                        "not follow (see the log)"))
    return "\n".join(lines) + "\n"


def _protocols(peer: Mapping[str, Any]) -> str:
    """How many protocols its identify listed, and whether murmur's are among
    them (the list itself is in ``--output json``: a dozen ids do not fit a row)."""
    protocols = peer.get("protocols") or []
    if not protocols:
        return "–"
    murmur = any(str(p).startswith(MURMUR_PROTOCOL_PREFIX) for p in protocols)
    return f"{len(protocols)}" + (" murmur" if murmur else "")


def _connected(peer: Mapping[str, Any]) -> str:
    """"yes", "no", or how long it stays banned (refused and never dialled till then)."""
    if peer.get("connected"):
        return "yes"
    banned_for = peer.get("banned_for_s") or 0
    return f"banned:{math.ceil(banned_for / 60)}min" if banned_for > 0 else "no"  # one token: a column


def render_peers(peers: Sequence[Mapping[str, Any]]) -> str:
    """One row per known peer: connected and learning neighbours first; what
    its identify said (agent, protocols, the address it observed us at)."""
    header = ("peer", "connected", "neighbour", "score", "agent", "protocols", "observed-us", "addresses")
    rows = [
        (str(p.get("peer_id", "–"))[:SHORT_PEER] + "…", _connected(p),
         "yes" if p.get("neighbour") else "no", fmt_number(p.get("score"), 2),
         str(p.get("agent") or "–"), _protocols(p), str(p.get("observed") or "–"),
         " ".join(str(a) for a in p.get("addrs") or []) or "–")
        for p in sorted(peers, key=lambda p: (not p.get("neighbour"), not p.get("connected"), str(p.get("peer_id"))))
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [header, *rows]]
    out.append(f"{len(rows)} known, {sum(1 for p in peers if p.get('connected'))} connected, "
               f"{sum(1 for p in peers if p.get('neighbour'))} neighbours"
               + (f", {banned} banned" if (banned := sum(1 for p in peers if p.get("banned_for_s"))) else ""))
    return "\n".join(out) + "\n"
