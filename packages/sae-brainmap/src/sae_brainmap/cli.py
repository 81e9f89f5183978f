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

from spikecore.train import SafeLightningCLI, trainer_defaults, user_errors_exit

from .brainmap import BrainMapSAE

# The frozen backbone is in eval mode on purpose.
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")


def make_cli(args: Sequence[str] | None, run: bool = True) -> SafeLightningCLI:
    """spikecore's LightningCLI (checkpoints read safely, a run folder per fit, ``last.ckpt`` every epoch)."""
    return SafeLightningCLI(
        BrainMapSAE,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=trainer_defaults(monitor=None),
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
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="run every stage again, even those whose outputs match their inputs (e.g. after replacing an "
        "input file in a way its size and time do not show)",
    )
    options = parser.parse_args(list(args))
    return run_pipeline(load_run_config(options.config, options.out), rebuild=options.rebuild)


def run(args: Sequence[str] | None = None) -> SafeLightningCLI | dict[str, str]:
    """Run a command (``["fit", "--config", ...]``; None: ``sys.argv``) and return the LightningCLI (for
    ``run``: the pipeline's ``{stage: "ran" | "skipped"}``)."""
    from_argv = args is None
    argv = list(sys.argv[1:] if from_argv else args)
    if argv and argv[0] == "run":
        return run_command(argv[1:])
    return make_cli(None if from_argv else argv)  # None: LightningCLI reads sys.argv itself


def main(args: Sequence[str] | None = None) -> None:
    """The ``sae-brainmap`` console script. Errors a user causes in ``run`` (a bad config value, an output
    folder that cannot be written, missing or bad brain data, images, SAE files or backbone weights, an
    activation store made with other settings, an SAE training that diverged) are printed as one line with
    exit status 2."""
    from spikecore.errors import UserError

    # UserError: RunConfigError, BrainDataError (images too), SAECheckpointError and BackboneWeightsError
    # (spikecore's CheckpointError), StoreError, SAETrainingError; and a file the config names but is missing
    user_errors = (UserError, FileNotFoundError)

    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] != "run":
        with user_errors_exit():  # a bad checkpoint, a config value, an unwritable folder: one line, exit 2
            run(args)
        return
    try:
        run(args)
    except user_errors as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
