"""Trajectory-Mixed Supervision (TMS) for Hugging Face TRL: reward-free, on-policy SFT that forgets less."""

# First, before PEFT (imported by TRL and by our modules) imports bitsandbytes and, on some CPUs, asks the Hub for a
# kernel: importing trl_tms must make no network request.
from .quantization import import_bitsandbytes_offline


import_bitsandbytes_offline()

from .candidates import TrajectoryStats
from .config import TMSConfig
from .data import to_prompt_completion
from .dial import AdapterScaleCurve, ScalePoint, apply_adapter_scale, trace_adapter_scale
from .generation import SamplingParams
from .history import AdapterHistory, SnapshotCallback
from .mixture import MixtureDataset
from .pld import PLDCallback, policy_label_divergence
from .rehearsal import REHEARSAL_PROMPTS, mix_in_rehearsal, self_rehearsal_dataset
from .retention import METER_PROMPTS, RetentionCallback
from .selection import DriftBudgetCallback
from .trainer import TMSTrainer
from .trajectories import generate_trajectories
from .vllm_generation import generate_trajectories_vllm, is_vllm_available

__version__ = "0.1.0"

__all__ = [
    "AdapterHistory",
    "AdapterScaleCurve",
    "DriftBudgetCallback",
    "METER_PROMPTS",
    "MixtureDataset",
    "PLDCallback",
    "REHEARSAL_PROMPTS",
    "RetentionCallback",
    "SamplingParams",
    "ScalePoint",
    "SnapshotCallback",
    "TMSConfig",
    "TMSTrainer",
    "TrajectoryStats",
    "apply_adapter_scale",
    "generate_trajectories",
    "generate_trajectories_vllm",
    "is_vllm_available",
    "mix_in_rehearsal",
    "policy_label_divergence",
    "self_rehearsal_dataset",
    "to_prompt_completion",
    "trace_adapter_scale",
]
