"""Training plumbing shared by the spiking-transformer packages (tdformer, spiliformer) and sae-brainmap.

Needs the ``train`` extra (``pip install "spikecore[train]"``): pytorch-lightning, jsonargparse, timm.

- :class:`SpikingClassifier`: the LightningModule of the papers' recipe (AdamW, warm-up + cosine per
  step, mixup/cutmix and label smoothing from timm, top-1 accuracy); packages subclass it to change the
  loss (TDFormer's per-segment losses, SpiLiFormer's two passes).
- :func:`warmup_cosine`: the learning-rate multiplier.
- :func:`run_cli`: a package's ``main`` (LightningCLI plus extra commands such as ``analyze``);
  :class:`SafeLightningCLI` the LightningCLI under it, which reads every checkpoint safely.
- :func:`load_checkpoint`: a checkpoint read safely (local file, ``weights_only=True``, checksums and finite
  values checked), with clear errors.
"""

from .callbacks import last_checkpoint
from .checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
from .classifier import SpikingClassifier
from .cli import SafeLightningCLI, SpikingCLI, console_main, run_cli, trainer_defaults, user_errors_exit
from .schedule import warmup_cosine

__all__ = [
    "CheckpointError",
    "SafeCheckpointIO",
    "SafeLightningCLI",
    "SpikingCLI",
    "SpikingClassifier",
    "console_main",
    "last_checkpoint",
    "load_checkpoint",
    "run_cli",
    "trainer_defaults",
    "user_errors_exit",
    "warmup_cosine",
]
