"""The ``sae-brainmap`` command: LightningCLI (``fit / validate``) on :class:`BrainMapSAE`.

``sae-brainmap fit --config configs/demo.yaml [--config more.yaml] [--model.kind topk ...]``; the data
module is chosen in the config by ``class_path`` (``sae_brainmap.ImageDataModule`` for online training,
``sae_brainmap.StoreDataModule`` for an activation store).
``sae-brainmap run --config configs/demo_run.yaml [--out DIR]`` runs the whole pipeline (:mod:`.pipeline`).
"""

import sys
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from spikecore.train import load_checkpoint
from spikecore.train.cli import ckpt_path_arg

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


def run_command(args: Sequence[str]) -> dict[str, str]:
    """``sae-brainmap run --config RUN.yaml [--out DIR]``: the whole pipeline (see :mod:`.pipeline`)."""
    import argparse

    from .pipeline import run_pipeline
    from .run_config import load_run_config

    parser = argparse.ArgumentParser(
        prog="sae-brainmap run",
        description="Run the SAE-BrainMap pipeline end to end (activations, SAEs, brain data, voxel "
        "dictionary, analyses, maps, report); stages whose outputs match their inputs are skipped.",
    )
    parser.add_argument("--config", required=True, help="the run config (YAML), e.g. configs/demo_run.yaml")
    parser.add_argument("--out", default=None, help="output folder (overrides the config's `out`)")
    options = parser.parse_args(list(args))
    return run_pipeline(load_run_config(options.config, options.out))


def run(args: Sequence[str] | None = None) -> SAECLI | dict[str, str]:
    """Run a command (``["fit", "--config", ...]``; None: ``sys.argv``) and return the LightningCLI (for
    ``run``: the pipeline's ``{stage: "ran" | "skipped"}``)."""
    from_argv = args is None
    argv = list(sys.argv[1:] if from_argv else args)
    if argv and argv[0] == "run":
        return run_command(argv[1:])
    ckpt = ckpt_path_arg(argv)
    if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry"):
        load_checkpoint(ckpt)  # missing, corrupted or unsafe: one clear error before any work starts
    return make_cli(None if from_argv else argv)  # None: LightningCLI reads sys.argv itself


def main(args: Sequence[str] | None = None) -> None:
    """The ``sae-brainmap`` console script. Errors a user causes in ``run`` (a bad config, missing
    brain data or checkpoints) are printed as one message with exit status 2."""
    from .brain.errors import BrainDataError
    from .checkpoint import SAECheckpointError
    from .run_config import RunConfigError

    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] != "run":
        run(args)
        return
    try:
        run(args)
    except (RunConfigError, BrainDataError, SAECheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
