"""Regenerate tests/unit/privacy/data/specs_er_graphs.json: the reference's own ER graphs.

The CorN paper's (Rodio et al. 2025) n = 20 Erdős–Rényi residual table (CorN vs
pairwise vs LDP) comes from that paper's code (arodio/WhisperDSGD). Its graph
generator seeds Python's ``random`` with the run seed, then draws
``igraph.Graph.Erdos_Renyi(n, p)`` (python-igraph uses ``random`` as its RNG)
until the graph is connected, at most 100 tries; its experiment scripts run the
seeds below. The residual ratios depend on the graph alone (the SDP is
homogeneous in μ), so replaying these draws is the only way to compare against
the table on the same graphs rather than on our own ER draws.

Needs python-igraph, which is NOT a murmur dependency; install it for yourself:

    .venv/bin/pip install igraph==1.0.0
    .venv/bin/python bench/specs_er_graphs.py            # writes the fixture
    .venv/bin/python bench/specs_er_graphs.py --check    # compares, exit 1 on drift

igraph 0.10.8, 0.11.8 and 1.0.0 give identical graphs for these seeds; 0.9.x
(an older RNG bridge) gives different ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests/unit/privacy/data/specs_er_graphs.json"
NODES = 20
PROBABILITIES = (0.2, 0.4, 0.6, 0.8, 1.0)
# paper_experiments/*/n20e10p*.sh of the reference
SEEDS = (12, 123, 1234, 12345, 57, 1453, 1927, 1956, 2011)
MAX_TRIES = 100  # the reference gives up after 100 disconnected draws


def draw(n: int, p: float, seed: int) -> list[tuple[int, int]]:
    """Edge list (i < j, sorted) of the reference's connected G(n, p) draw for ``seed``."""
    from igraph import Graph  # optional, bench-only dependency

    random.seed(seed)
    for _ in range(MAX_TRIES):
        graph = Graph.Erdos_Renyi(n=n, p=p, directed=False)
        if graph.is_connected():
            return sorted((min(e), max(e)) for e in graph.get_edgelist())
    raise RuntimeError(f"no connected G({n}, {p}) in {MAX_TRIES} tries for seed {seed}")


def build() -> dict[str, object]:
    import igraph

    return {
        "about": (
            "Reference (arodio/WhisperDSGD utils/graph.py) Erdős–Rényi draws: random.seed(seed), "
            "igraph Graph.Erdos_Renyi(n, p) until connected (max 100 tries). "
            "Regenerate with bench/specs_er_graphs.py."
        ),
        "igraph_version": igraph.__version__,
        "nodes": NODES,
        "seeds": list(SEEDS),
        "graphs": {str(p): {str(s): draw(NODES, p, s) for s in SEEDS} for p in PROBABILITIES},
    }


def _dump(data: dict[str, object]) -> str:
    # one graph per line: small diffs, still plain JSON
    graphs = data["graphs"]
    assert isinstance(graphs, dict)
    head = {k: v for k, v in data.items() if k != "graphs"}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "graphs": {']
    for pi, (p, by_seed) in enumerate(graphs.items()):
        lines.append(f'  "{p}": {{')
        for si, (s, edge_list) in enumerate(by_seed.items()):
            comma = "," if si < len(by_seed) - 1 else ""
            lines.append(f'    "{s}": {json.dumps(edge_list, separators=(",", ":"))}{comma}')
        lines.append("  }" + ("," if pi < len(graphs) - 1 else ""))
    lines.append("}}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored fixture instead of writing")
    args = parser.parse_args()
    data = build()
    if args.check:
        stored = json.loads(FIXTURE.read_text())
        same = stored["graphs"] == json.loads(json.dumps(data["graphs"]))
        print("fixture matches" if same else "fixture DIFFERS from this igraph's draws")
        return 0 if same else 1
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(_dump(data))
    print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
