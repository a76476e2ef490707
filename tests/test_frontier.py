"""The frontier arithmetic of the study (benchmarks/harness/frontier.py), on hand-made points."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from harness.frontier import (  # noqa: E402
    Point, deciding_points, dominates, drift_at_gain, drift_needed, drift_ratio, envelope, pareto_front)


def test_the_front_keeps_only_points_nothing_beats_on_both():
    points = [(0.1, 0.2), (0.2, 0.1), (0.3, 0.5), (0.3, 0.4), (0.5, 0.45), (0.6, 0.7), (0.1, 0.2)]
    assert pareto_front(points) == [(0.1, 0.2), (0.3, 0.5), (0.6, 0.7)]
    assert pareto_front([]) == []


def test_drift_at_a_gain_level_interpolates_between_front_points_from_the_base_model():
    front = [(0.2, 0.4), (0.6, 0.8)]
    assert drift_at_gain(front, 0.2) == pytest.approx(0.1)    # half way from the base (0, 0) to (0.2, 0.4)
    assert drift_at_gain(front, 0.4) == pytest.approx(0.2)    # on a point
    assert drift_at_gain(front, 0.6) == pytest.approx(0.4)    # half way between the two points
    assert drift_at_gain(front, 0.8) == pytest.approx(0.6)
    assert drift_at_gain(front, 0.81) is None                 # beyond the best point: unreachable
    assert drift_at_gain(front, 0.2, origin=None) == pytest.approx(0.2)  # without the base: the first point
    # A dominated point changes nothing.
    assert drift_at_gain(front + [(0.5, 0.3)], 0.6) == pytest.approx(0.4)


def test_the_points_that_decide_a_level_are_the_ends_of_its_envelope_segment():
    """Issue #44 asks three seeds for every point a level's drift is read between; (0.5, 0.6) is on the front but under
    the envelope from (0.3, 0.5) to (0.9, 0.9), so it decides nothing, and the base model is not a measured point."""
    front = [(0.1, 0.2), (0.3, 0.5), (0.5, 0.6), (0.9, 0.9)]
    assert deciding_points(front, [0.55]) == [(0.3, 0.5), (0.9, 0.9)]
    assert drift_at_gain(front, 0.55) == pytest.approx(0.3 + 0.6 * 0.05 / 0.4)  # read between those two
    assert deciding_points(front, [0.1]) == [(0.1, 0.2)]  # between the base model and the first point
    assert deciding_points(front, [0.1, 0.55, 0.95]) == [(0.1, 0.2), (0.3, 0.5), (0.9, 0.9)]  # 0.95: never reached
    assert deciding_points(front, [0.5]) == [(0.1, 0.2), (0.3, 0.5)]  # reached at a point: read off the segment to it
    assert deciding_points(front, [0.0]) == [] and deciding_points([], [0.5]) == []


def test_one_front_dominates_another_only_if_it_needs_no_more_drift_at_every_level():
    sft = [(0.3, 0.5), (0.7, 1.0)]
    better = [(0.1, 0.5), (0.35, 1.0)]
    crossing = [(0.1, 0.5), (0.9, 1.0)]
    short = [(0.05, 0.5)]  # never reaches 1.0
    levels = [0.5, 0.8, 1.0]
    assert dominates(better, sft, levels) and not dominates(sft, better, levels)
    assert not dominates(crossing, sft, levels) and not dominates(sft, crossing, levels)
    assert not dominates(short, sft, levels)


def test_drift_needed_has_no_width_with_one_seed_and_brackets_the_mean_with_several():
    one_seed = [Point("a", [0.2], [0.4]), Point("b", [0.6], [0.8])]
    result = drift_needed(one_seed, [0.6], samples=200)
    assert result[0.6] == {"drift": pytest.approx(0.4), "low": pytest.approx(0.4), "high": pytest.approx(0.4)}
    seeds = [Point("a", [0.1, 0.3], [0.4, 0.4]), Point("b", [0.5, 0.7], [0.8, 0.8])]
    result = drift_needed(seeds, [0.6], samples=500)[0.6]
    assert result["drift"] == pytest.approx(0.4)
    # Each point's drift ranges over its seeds: a at 0.1-0.3, b at 0.5-0.7, so the need lies in 0.3-0.5.
    assert 0.3 - 1e-9 <= result["low"] < result["drift"] < result["high"] <= 0.5 + 1e-9


def test_an_unreachable_level_has_no_drift_and_an_open_interval():
    points = [Point("a", [0.2, 0.2], [0.5, 0.9])]  # reaches 0.7 on the mean, not on every resample
    result = drift_needed(points, [0.7, 0.95], samples=300)
    assert result[0.7]["drift"] == pytest.approx(0.2) and result[0.7]["high"] is None
    assert result[0.95] == {"drift": None, "low": None, "high": None}


def test_the_ratio_is_method_over_alternative_with_an_interval():
    tms = [Point("t", [0.1, 0.1], [0.5, 0.5]), Point("t2", [0.2, 0.2], [1.0, 1.0])]
    alternative = [Point("lr", [0.4, 0.4], [1.0, 1.0])]
    result = drift_ratio(tms, alternative, [0.5, 1.0], samples=100)
    assert result[1.0] == {"ratio": pytest.approx(0.5), "low": pytest.approx(0.5), "high": pytest.approx(0.5)}
    assert result[0.5]["ratio"] == pytest.approx(0.1 / 0.2)
    assert drift_ratio(tms, [Point("weak", [0.1], [0.5])], [1.0], samples=10)[1.0]["ratio"] is None


def test_a_point_needs_one_drift_per_gain():
    with pytest.raises(ValueError, match="one drift and one gain per seed"):
        Point("bad", [0.1, 0.2], [0.3])


def test_more_measured_points_never_raise_the_drift_read_off_the_frontier():
    front = [(0.3, 0.6)]
    assert drift_at_gain(front, 0.45) == pytest.approx(0.225)  # on the line from the base model
    # A point just below that line is on the raw front (less drift, some gain) but under the envelope: passed over.
    assert drift_at_gain(front + [(0.29, 0.4)], 0.45) == pytest.approx(0.225)
    # A point above the line is on the envelope and lowers the drift needed.
    assert drift_at_gain(front + [(0.1, 0.4)], 0.45) == pytest.approx(0.1 + 0.2 * 0.05 / 0.2)
    assert envelope([(0.0, 0.0), (0.29, 0.4), (0.3, 0.6), (0.5, 0.61), (0.6, 0.7)]) == [(0.0, 0.0), (0.3, 0.6), (0.6, 0.7)]
