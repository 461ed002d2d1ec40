"""Run monitoring (global rank 0): metrics.jsonl, TensorBoard, W&B, sample dumps, progress, plots.

See ``docs/metrics.md`` for every metric key and the files of a run directory.
"""

from rlmt_megatron.monitoring.metrics import (
    MetricsLogger,
    MonitoringConfig,
    WandbConfig,
    read_metrics,
    resolve_wandb_mode,
    truncate_metrics,
    write_resolved_config,
)
from rlmt_megatron.monitoring.progress import DEFAULT_PROGRESS_KEYS, PhaseTimer, ProgressReporter
from rlmt_megatron.monitoring.samples import SAMPLE_KEYS, samples_path, write_samples

# plot.py is imported on use (rlmt-plot): it is the only part that needs matplotlib.
__all__ = [
    "DEFAULT_PROGRESS_KEYS", "MetricsLogger", "MonitoringConfig", "PhaseTimer", "ProgressReporter",
    "SAMPLE_KEYS", "WandbConfig", "read_metrics", "resolve_wandb_mode", "samples_path",
    "truncate_metrics", "write_resolved_config", "write_samples",
]
