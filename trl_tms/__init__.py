"""Trajectory-Mixed Supervision (TMS) for Hugging Face TRL: reward-free, on-policy SFT that forgets less."""

from .config import TMSConfig
from .data import to_prompt_completion
from .forgetting import METER_PROMPTS, RetentionCallback
from .history import AdapterHistory, SnapshotCallback
from .mixture import MixtureDataset, TrajectoryStats
from .pld import PLDCallback, policy_label_divergence
from .rehearsal import REHEARSAL_PROMPTS, mix_in_rehearsal, self_rehearsal_dataset
from .selection import DriftBudgetCallback
from .trainer import TMSTrainer
from .trajectories import SamplingParams, generate_trajectories
from .vllm_generation import generate_trajectories_vllm, is_vllm_available

__version__ = "0.1.0"

__all__ = [
    "AdapterHistory",
    "DriftBudgetCallback",
    "METER_PROMPTS",
    "MixtureDataset",
    "PLDCallback",
    "REHEARSAL_PROMPTS",
    "RetentionCallback",
    "SamplingParams",
    "SnapshotCallback",
    "TMSConfig",
    "TMSTrainer",
    "TrajectoryStats",
    "generate_trajectories",
    "generate_trajectories_vllm",
    "is_vllm_available",
    "mix_in_rehearsal",
    "policy_label_divergence",
    "self_rehearsal_dataset",
    "to_prompt_completion",
]
