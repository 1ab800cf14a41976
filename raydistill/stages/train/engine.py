"""The DeepSpeed side of a training worker: its config from the run's sections, and the engine."""

from __future__ import annotations

import os

from raydistill.config.sections import EngineConfig, OptimizerConfig, ScheduleConfig
from raydistill.runtime.verbosity import is_verbose, quiet_library_loggers

__all__ = ["deepspeed_config", "import_deepspeed"]


def deepspeed_config(optim: OptimizerConfig, schedule: ScheduleConfig, engine: EngineConfig, bf16: bool) -> dict:
    """ZeRO stage, AdamW (torch's, no JIT build), warmup + cosine, clipping, precision."""
    zero: dict = {"stage": engine.zero_stage}
    if engine.offload and engine.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": schedule.micro_batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": optim.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": schedule.steps, "warmup_num_steps": max(1, optim.warmup_steps),
            "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": optim.min_lr_ratio}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW: no multi-minute CPUAdam JIT build
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def import_deepspeed(use_cuda: bool):
    """DeepSpeed, set up for this process's accelerator and kept quiet unless asked to speak."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
    if not is_verbose():
        quiet_library_loggers()
    import deepspeed

    if not use_cuda:
        # DeepSpeed's CPU shared-memory allreduce is a C++ op JIT-built on first use (minutes on a
        # laptop); gloo's allreduce is plenty for CPU runs. DeepSpeed keeps this dict editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
