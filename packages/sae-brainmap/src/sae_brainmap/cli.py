"""The ``sae-brainmap`` command: LightningCLI (``fit / validate``) on :class:`BrainMapSAE`.

``sae-brainmap fit --config configs/demo.yaml [--config more.yaml] [--model.kind topk ...]``; the data
module is chosen in the config by ``class_path`` (``sae_brainmap.ImageDataModule`` for online training,
``sae_brainmap.StoreDataModule`` for an activation store).
"""

import sys
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from spikecore.train import load_checkpoint

from .brainmap import BrainMapSAE

# The frozen backbone is in eval mode on purpose.
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")


class SAECLI(LightningCLI):
    """LightningCLI without spikecore's classification links (no num_classes here)."""


def make_cli(args: Sequence[str] | None, run: bool = True) -> SAECLI:
    return SAECLI(
        BrainMapSAE,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True, filename="sae-{epoch}")]},
        args=list(args) if args is not None else None,
        run=run,
    )


def _ckpt_path(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--ckpt_path="):
            return a.split("=", 1)[1]
    return None


def run(args: Sequence[str] | None = None) -> SAECLI:
    """Run a command (``["fit", "--config", ...]``; None: ``sys.argv``) and return the LightningCLI."""
    argv = list(sys.argv[1:] if args is None else args)
    ckpt = _ckpt_path(argv)
    if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry"):
        load_checkpoint(ckpt)  # missing, corrupted or unsafe: one clear error before any work starts
    return make_cli(argv)


def main(args: Sequence[str] | None = None) -> None:
    """The ``sae-brainmap`` console script."""
    run(args)


if __name__ == "__main__":
    main()
