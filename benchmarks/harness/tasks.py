"""
Target tasks for the study (`study.py`): reasoning-gym generators with worked answers that end in `#### N`, scored by
the final number of a greedy answer (`trl_tms.probes.embedded.is_correct`).

`leg_counting` is the "learn from zero" task (the embedded model scores 0 on it). The others are candidates for the
"partly solved" regime, where the base model already answers some items and SFT should raise it (the paper's
situation); `python benchmarks/study.py --screen` measures them and `results/study/screen.md` records the choice.
`basic_arithmetic` and `chain_sum` are kept out: they are reserved for an independent check.
"""

from __future__ import annotations

import math

from trl_tms.probes.embedded import letter_count_steps


def _products(item: dict) -> str:
    a, b = (int(t) for t in item["metadata"]["expression"].split("*"))
    return f"{a} * {b} = {a * b}\n#### {a * b}"


def _gcd(item: dict) -> str:
    a, b = sorted(item["metadata"]["numbers"], reverse=True)
    lines = []
    x, y = a, b
    while y:
        lines.append(f"{x} = {x // y} x {y} + {x % y}")
        x, y = y, x % y
    lines.append(f"GCD = {x}")
    return "\n".join(lines) + f"\n#### {x}"


def _lcm(item: dict) -> str:
    a, b = item["metadata"]["numbers"]
    g = math.gcd(a, b)
    return f"GCD({a}, {b}) = {g}\nLCM = {a} x {b} / {g} = {a * b // g}\n#### {a * b // g}"


def _count_bits(item: dict) -> str:
    n = item["metadata"]["number"]
    ones = bin(n).count("1")
    return f"{n} in binary is {bin(n)[2:]}, which has {ones} ones.\n#### {ones}"


# name -> (reasoning-gym generator, its settings, worked answer of an item)
CANDIDATES = {
    "products_2x1digit": ("products", dict(min_digits=1, max_digits=2), _products),
    "gcd_small": ("gcd", dict(min_value=2, max_value=60), _gcd),
    "lcm_small": ("lcm", dict(min_value=2, max_value=20), _lcm),
    # The main job's task too (`trl_tms.probes.embedded.load_letter_counting` draws the same splits).
    "letter_counting_short": ("letter_counting", dict(min_words=1, max_words=3),
                              lambda item: letter_count_steps(item["metadata"]["target_letter"], item["metadata"]["span"])),
    "count_bits_small": ("count_bits", dict(min_n=1, max_n=255), _count_bits),
}


def load_task(name: str, num_train: int, num_test: int, seed: int = 0):
    """`(train, test)` of a task by name: `leg_counting` or a `CANDIDATES` key; no question appears in both."""
    from trl_tms.probes.embedded import distinct_splits, load_leg_counting

    if name == "leg_counting":
        return load_leg_counting(num_train, num_test, seed=seed)
    if name not in CANDIDATES:
        raise ValueError(f"Unknown task {name!r}: use leg_counting or one of {sorted(CANDIDATES)}.")
    import reasoning_gym

    generator, settings, worked = CANDIDATES[name]
    source = reasoning_gym.create_dataset(generator, size=4 * (num_train + num_test) + 64, seed=seed, **settings)
    return distinct_splits(source, worked, num_train, num_test)
