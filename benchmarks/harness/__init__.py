"""The benchmarks' harness: arms declared as settings, one probe suite, one result format, one report and its plots.

- `registry`: every arm (a method and its settings) and regime; `tasks`: the target tasks;
- `training`: an arm's trainer, trained with its adapter kept at the steps to measure;
- `probes` (with `instruction_following`, `trajectory_quality`): what a model learned and forgot;
- `records`: one JSON record per (regime, arm, seed), resumable; `report` and `plots`: the comparison.

`study.py` and `cost_t10.py` are drivers over it.
"""
