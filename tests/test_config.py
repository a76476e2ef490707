"""`TMSConfig`: fields and the value checks of its own fields, importable without the generation stack."""

import os
import subprocess
import sys

import pytest
from conftest import QUIET_CPU

from trl_tms import MixtureDataset, TMSConfig
from trl_tms.filters import keep_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_config_imports_no_generation_or_mixture_code():
    # The package's __init__ imports everything, so load `trl_tms.config` with the package as a bare namespace: what is
    # imported then is what config.py itself needs.
    code = (
        "import sys, types\n"
        "package = types.ModuleType('trl_tms')\n"
        f"package.__path__ = [{os.path.join(ROOT, 'trl_tms')!r}]\n"
        "sys.modules['trl_tms'] = package\n"
        "import trl_tms.config\n"
        "trl_tms.config.TMSConfig('out', use_cpu=True, bf16=False, report_to='none')\n"
        "print(sorted(name for name in sys.modules if name.startswith('trl_tms.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    imported = set(eval(result.stdout.strip().splitlines()[-1]))
    assert "trl_tms.config" in imported
    elsewhere = {"trl_tms.generation", "trl_tms.trajectories", "trl_tms.vllm_generation", "trl_tms.routing", "trl_tms.probes",
                 "trl_tms.mixture", "trl_tms.filters", "trl_tms.rehearsal", "trl_tms.history", "trl_tms.trainer"}
    assert not imported & elsewhere, imported & elsewhere


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("trajectory_choice", "best", "`trajectory_choice` must be one of uniform, curriculum, pld, got 'best'."),
        ("unfinished_trajectories", "cut", "`unfinished_trajectories` must be one of truncate, drop, keep, got 'cut'."),
        (
            "trajectory_filter",
            "vote",
            "`trajectory_filter` must be one of none, self_consistency, verifier, got 'vote'.",
        ),
    ],
)
def test_a_choice_is_refused_with_the_same_message_by_the_config_and_by_the_module_that_acts_on_it(
    field, value, message, tmp_path
):
    with pytest.raises(ValueError) as from_config:
        TMSConfig(str(tmp_path), recipe="paper", **{field: value}, **QUIET_CPU)
    assert str(from_config.value) == message
    with pytest.raises(ValueError) as from_module:
        if field == "trajectory_choice":
            MixtureDataset(None, label_weight=0.5, seed=0, trajectory_choice=value)
        else:
            keep_flags(None, None, **{"unfinished" if field == "unfinished_trajectories" else field: value})
    assert str(from_module.value) == message
