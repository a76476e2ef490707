"""The core imports no evaluation probes: the probes (`trl_tms.probes`) serve the demo and the benchmarks only."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def modules_loaded_by(*statements: str) -> list[list[str]]:
    """The `trl_tms` modules a fresh interpreter has loaded after each of `statements`, run in turn."""
    report = "print(json.dumps(sorted(m for m in sys.modules if m.startswith('trl_tms'))))"
    code = "\n".join(["import json, sys"] + [line for statement in statements for line in (statement, report)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return [json.loads(line) for line in result.stdout.strip().splitlines()[-len(statements):]]


def test_the_core_loads_no_probe_and_the_probes_are_one_subpackage():
    # One interpreter for both (an import of the stack takes seconds): the trainer first, then the probes.
    core, probes = modules_loaded_by("import trl_tms.trainer", "import trl_tms.probes")
    assert {"trl_tms.trainer", "trl_tms.mixture", "trl_tms.history", "trl_tms.signals", "trl_tms.retention",
            "trl_tms.rehearsal", "trl_tms.generation"} <= set(core)
    assert [name for name in core if name.startswith("trl_tms.probes")] == []
    assert {"trl_tms.probes.measures", "trl_tms.probes.readers", "trl_tms.probes.comparison",
            "trl_tms.probes.embedded"} <= set(probes)
