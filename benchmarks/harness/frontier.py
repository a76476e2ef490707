"""
The accuracy-forgetting frontier of a method, and the drift it needs to reach a level of target gain.

A method is a set of points, each a setting of its dial (learning rate, stopping step, adapter scale, label share...)
measured over one or more seeds: per seed, a drift (chat KL, WikiText change: lower is better) and a target gain
(accuracy above the base model's: higher is better). Its frontier is the points no other point of the method beats on
both; the drift it needs for a gain level is read off the frontier, linearly between its neighbouring points (the base
model, drift 0 and gain 0, is every method's first point: stopping at step 0, or scaling the adapter to 0), along its
concave envelope, so that measuring more points never makes a method look worse. Intervals
come from resampling each point's seeds (a percentile bootstrap).

Pure arithmetic on numbers: the study feeds it its records (see `study.py`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

ORIGIN = (0.0, 0.0)  # the base model: no drift, no gain


@dataclass
class Point:
    """One setting of a method's dial, with its per-seed drift and gain (same seeds, same order)."""

    label: str
    drift: list[float]
    gain: list[float]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.drift or len(self.drift) != len(self.gain):
            raise ValueError(f"Point {self.label!r}: give one drift and one gain per seed ({self.drift}, {self.gain}).")

    @property
    def mean(self) -> tuple[float, float]:
        return sum(self.drift) / len(self.drift), sum(self.gain) / len(self.gain)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """
    The (drift, gain) points that no other point beats on both (lower or equal drift and higher or equal gain, one of
    them strictly), sorted by drift; along it, gain rises with drift.
    """
    front = []
    for drift, gain in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or gain > front[-1][1]:
            front.append((drift, gain))
    return front


def envelope(front: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """
    The frontier's concave envelope: its points that lie on or above the straight line between any two others, by
    drift. Interpolating along it, more measured points never make a method look worse (between neighbours on the
    raw front, a point just below the line from its neighbours would raise the drift read off between them).
    """
    hull = []
    for point in pareto_front(front):
        while len(hull) >= 2:
            (d0, g0), (d1, g1) = hull[-2], hull[-1]
            if (g1 - g0) * (point[0] - d0) <= (point[1] - g0) * (d1 - d0):  # hull[-1] on or below the line
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def drift_at_gain(front: list[tuple[float, float]], level: float, origin: tuple[float, float] | None = ORIGIN):
    """
    The least drift at which the frontier reaches `level` of gain, interpolated linearly along its concave envelope
    (from `origin` when given); `None` when no point reaches it.
    """
    segment = _segment(envelope(front + ([origin] if origin is not None else [])), level)
    if segment is None:
        return None
    if len(segment) == 1:
        return segment[0][0]
    (d0, g0), (d1, g1) = segment
    return d0 + (d1 - d0) * (level - g0) / (g1 - g0)


def _segment(points: list[tuple[float, float]], level: float) -> tuple | None:
    """The envelope's neighbouring points between which it reaches `level` (one point where the first reaches it)."""
    if not points or points[-1][1] < level:
        return None
    if points[0][1] >= level:
        return (points[0],)
    return next((p0, p1) for p0, p1 in zip(points, points[1:]) if p1[1] >= level)


def deciding_points(front: list[tuple[float, float]], levels: list[float],
                    origin: tuple[float, float] = ORIGIN) -> list[tuple[float, float]]:
    """
    The measured points the drift at `levels` is read between (each level's segment of the envelope, the origin left
    out): the points whose seeds decide the comparison at those levels, by drift.
    """
    points = envelope(front + [origin])
    found = {p for level in levels for p in (_segment(points, level) or ()) if p != origin}
    return sorted(found)


def dominates(a: list[tuple[float, float]], b: list[tuple[float, float]], levels: list[float]) -> bool:
    """Whether frontier `a` needs no more drift than `b` at every level `b` reaches, and reaches every such level."""
    for level in levels:
        need_b = drift_at_gain(b, level)
        if need_b is None:
            continue
        need_a = drift_at_gain(a, level)
        if need_a is None or need_a > need_b:
            return False
    return True


def _resampled_means(points: list[Point], rng: random.Random) -> list[tuple[float, float]]:
    means = []
    for point in points:
        picks = [rng.randrange(len(point.drift)) for _ in point.drift]
        means.append((sum(point.drift[i] for i in picks) / len(picks), sum(point.gain[i] for i in picks) / len(picks)))
    return means


def _interval(values: list[float | None], confidence: float) -> tuple[float | None, float | None]:
    """Percentile interval; an unreachable (None) replicate counts as infinite drift."""
    ordered = sorted(math.inf if v is None else v for v in values)
    low = ordered[int(math.floor((1 - confidence) / 2 * (len(ordered) - 1)))]
    high = ordered[int(math.ceil((1 + confidence) / 2 * (len(ordered) - 1)))]
    return (None if math.isinf(low) else low), (None if math.isinf(high) else high)


def drift_needed(points: list[Point], levels: list[float], samples: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> dict[float, dict]:
    """
    Per gain level: the drift the frontier of the points' means needs (`drift`), and its bootstrap interval over the
    points' seeds (`low`, `high`; `None` where a bound is unreachable).
    """
    front = [p.mean for p in points]
    rng = random.Random(seed)
    replicates = [pareto_front(_resampled_means(points, rng)) for _ in range(samples)]
    result = {}
    for level in levels:
        low, high = _interval([drift_at_gain(r, level) for r in replicates], confidence)
        result[level] = {"drift": drift_at_gain(front, level), "low": low, "high": high}
    return result


def drift_ratio(method: list[Point], alternative: list[Point], levels: list[float], samples: int = 2000,
                seed: int = 0, confidence: float = 0.95) -> dict[float, dict]:
    """
    Per gain level: drift needed by `method` / drift needed by `alternative` (below 1: the method needs less), with a
    bootstrap interval resampling both methods' seeds. `None` where either frontier does not reach the level.
    """
    rng = random.Random(seed)
    method_front, alternative_front = [p.mean for p in method], [p.mean for p in alternative]
    pairs = [(pareto_front(_resampled_means(method, rng)), pareto_front(_resampled_means(alternative, rng)))
             for _ in range(samples)]

    def ratio(a, b, level):
        need_a, need_b = drift_at_gain(a, level), drift_at_gain(b, level)
        if need_a is None or need_b is None:
            return None
        if need_b <= 0:  # the alternative reaches the level without drift (or with less than none): no ratio
            return None
        return need_a / need_b

    result = {}
    for level in levels:
        low, high = _interval([ratio(a, b, level) for a, b in pairs], confidence)
        result[level] = {"ratio": ratio(method_front, alternative_front, level), "low": low, "high": high}
    return result
