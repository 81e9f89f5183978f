"""Learning-rate schedule of the spiking-transformer recipes: linear warm-up, then cosine decay."""

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear from ``1 / (warmup_steps + 1)`` up to 1 over ``warmup_steps`` steps, then a half cosine from 1
    down to ``min_ratio`` at ``total_steps``; constant ``min_ratio`` after that.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
