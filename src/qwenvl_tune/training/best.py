"""How ``best/`` is chosen: the monitored metric, then a chain of tie-breakers, then the later weights."""

from __future__ import annotations

from pathlib import Path

from ..rundir import annotate

# Ties on the monitored metric are broken by these, in order (then the later validation wins).
TIE_BREAKERS = (("json_valid", 1), ("ted_accuracy", 1), ("edit_distance", -1))


def ranking_key(metrics: dict[str, float], monitor: str, mode: str) -> list[float]:
    """Larger is better: the monitored metric, then the tie-breakers."""
    sign = 1.0 if mode == "max" else -1.0
    return [sign * metrics[monitor.split("/", 1)[1]]] + [s * metrics[m] for m, s in TIE_BREAKERS]


def tie_reason(key: list[float], best: list[float]) -> str:
    for (name, _), a, b in zip(TIE_BREAKERS, key[1:], best[1:]):
        if a != b:
            return f"better {name}"
    return "equal on every tie-breaker, so the later weights"


def mark_best(path: Path, monitor: str, metrics: dict[str, float], why: str) -> None:
    """Record in best/'s marker which metrics chose it, and why."""
    annotate(path, metrics={f"val/{k}": v for k, v in metrics.items()}, monitor=monitor,
             value=metrics[monitor.split("/", 1)[1]], chosen_because=why)
