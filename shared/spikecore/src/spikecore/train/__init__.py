"""Training plumbing shared by the spiking-transformer packages (tdformer, spiliformer).

Needs the ``train`` extra (``pip install "spikecore[train]"``): pytorch-lightning, jsonargparse, timm.

- :class:`SpikingClassifier`: the LightningModule of the papers' recipe (AdamW, warm-up + cosine per
  step, mixup/cutmix and label smoothing from timm, top-1 accuracy); packages subclass it to change the
  loss (TDFormer's per-segment losses, SpiLiFormer's two passes).
- :func:`warmup_cosine`: the learning-rate multiplier.
- :func:`run_cli`: a package's ``main`` (LightningCLI plus extra commands such as ``analyze``).
- :func:`load_checkpoint`: a checkpoint read safely (``weights_only=True``), with clear errors.
"""

from .checkpoint import load_checkpoint
from .classifier import SpikingClassifier
from .cli import SpikingCLI, console_main, run_cli
from .schedule import warmup_cosine

__all__ = ["SpikingCLI", "SpikingClassifier", "console_main", "load_checkpoint", "run_cli", "warmup_cosine"]
