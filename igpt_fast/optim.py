"""The optimizer of the training recipe and the shape of its learning-rate schedule (Chen et al. 2020,
section 3.5): AdamW with betas (0.9, 0.95), weight decay (if any) on matrices only, and a linear warmup
followed by a cosine decay to a floor.

Its own module because it is one concept that pretraining (train.py), finetuning and the benchmarks share
and that holds no run state; train.lr_at binds the schedule to a TrainConfig.
"""
import math

import torch


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                        betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; weight decay (if any) on matrices only, never on norms, sos or positions' gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup over warmup_steps,
    then cosine decay to min_ratio at decay_steps, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
