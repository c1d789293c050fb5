"""Can Ray ever place these actors? Checked against what the cluster's nodes *have*, not what is
free now, so that an impossible request fails at once, naming the resource, instead of waiting out
a placement timeout (Ray itself keeps an infeasible actor pending forever).

Pure arithmetic over `ray.nodes()` resource dicts; `alive_nodes()` is the one call into Ray."""

from __future__ import annotations

import math

from asft_ray.errors import AsftError


def alive_nodes() -> list[dict]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def fit_on_node(node: dict, ask: dict) -> int:
    """How many actors that each ask `ask` ({"CPU": 1, "GPU": 0, "memory": bytes}) one node holds."""
    counts = [math.floor(node.get(key, 0) / value + 1e-9) for key, value in ask.items() if value]
    return min(counts) if counts else math.inf


def never_fits(nodes: list[dict], ask: dict, n: int = 1) -> str | None:
    """Why `n` actors asking `ask` each can never all be placed on `nodes`, or None if they can.

    Actors are identical, so the most the cluster holds is the sum of what each node holds."""
    if sum(min(fit_on_node(node, ask), n) for node in nodes) >= n:
        return None
    short = [
        f"{value:g} {key} each (the largest node has {max((node.get(key, 0) for node in nodes), default=0):g}, "
        f"the cluster {sum(node.get(key, 0) for node in nodes):g})"
        for key, value in ask.items()
        if value and sum(math.floor(node.get(key, 0) / value + 1e-9) for node in nodes) < n
    ]
    return ", ".join(short) or f"{ask} each"


def resource_ask(cpus: float, gpus: float = 0, memory_bytes: int | None = None) -> dict:
    """What one actor asks, in the keys of `ray.nodes()`' resource dicts."""
    return {"CPU": cpus, "GPU": gpus, "memory": memory_bytes or 0}


def require_placeable(what: str, ask: dict, n: int = 1, nodes: list[dict] | None = None) -> None:
    """Raise one clear AsftError if `n` actors asking `ask` each can never be placed on the cluster's
    nodes (`nodes`, default the alive ones): "`what` can never be placed: ..."."""
    if short := never_fits(alive_nodes() if nodes is None else nodes, ask, n):
        raise AsftError(f"{what} can never be placed: {'they ask' if n > 1 else 'it asks'} {short}")
