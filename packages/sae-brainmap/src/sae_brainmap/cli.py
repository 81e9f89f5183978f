"""The ``sae-brainmap`` command: ``fit`` (LightningCLI on :class:`BrainMapSAE`) and ``run``.

``sae-brainmap fit --config demo [--config more.yaml] [--model.kind topk ...]``; the data module is chosen
in the config by ``class_path`` (``sae_brainmap.ImageDataModule`` for online training,
``sae_brainmap.StoreDataModule`` for an activation store).
``sae-brainmap run --config demo_run [--config more.yaml] [--sae.k 16] [--out DIR] [--print_config]`` runs
the whole pipeline (:mod:`sae_brainmap.pipeline`), its config read by jsonargparse
(:func:`sae_brainmap.run_config.run_parser`). ``--config NAME`` names a config shipped with the package.
Errors a user causes are one ``error: ...`` line and exit status 2, as in tdformer and spiliformer.
"""

import sys
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl

from spikecore.train import SafeLightningCLI, trainer_defaults, user_errors_exit
from spikecore.train.cli import packaged_config

from .brainmap import BrainMapSAE

# The frozen backbone is in eval mode on purpose.
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")

RUN_HELP = (
    "run the whole brain-mapping pipeline (activations, SAEs, brain, dictionary, analysis, maps, report)"
)


class BrainMapCLI(SafeLightningCLI):
    """spikecore's LightningCLI with the one Lightning command that does something for SAEs: ``fit``. The
    data modules have no validation, test or predict split (the SAEs' metrics are logged while they
    train; ``run`` evaluates them against the brain), so ``validate`` / ``test`` / ``predict`` are not
    offered."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": SafeLightningCLI.subcommands()["fit"]}


def _resolve_configs(args: list[str]) -> list[str]:
    out, take_next = [], False
    for a in args:
        if take_next:
            a, take_next = packaged_config("sae_brainmap", a), False
        elif a == "--config":
            take_next = True
        elif a.startswith("--config="):
            a = "--config=" + packaged_config("sae_brainmap", a.split("=", 1)[1])
        out.append(a)
    return out


def make_cli(args: Sequence[str] | None, run: bool = True) -> SafeLightningCLI:
    """spikecore's LightningCLI (checkpoints read safely, a run folder per fit, ``last.ckpt`` every epoch)."""
    argv = sys.argv
    sys.argv = [argv[0], *_resolve_configs(list(argv[1:] if args is None else args))]
    try:  # LightningCLI reads sys.argv (and warns when it is given args beside it)
        return BrainMapCLI(
            BrainMapSAE,
            pl.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults(monitor=None),
            run=run,
            extra_commands={"run": RUN_HELP},
        )
    finally:
        sys.argv = argv


def run_command(args: Sequence[str]) -> dict[str, str]:
    """``sae-brainmap run --config RUN.yaml [...]``: the whole pipeline (see :mod:`sae_brainmap.pipeline`)."""
    from .pipeline import run_pipeline
    from .run_config import parse_run_args

    config, rebuild = parse_run_args(list(args))
    return run_pipeline(config, rebuild=rebuild)


def run(args: Sequence[str] | None = None) -> SafeLightningCLI | dict[str, str]:
    """Run a command (``["fit", "--config", ...]``; None: ``sys.argv``) and return the LightningCLI (for
    ``run``: the pipeline's ``{stage: "ran" | "skipped"}``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "run":
        return run_command(argv[1:])
    return make_cli(argv)


def main(args: Sequence[str] | None = None) -> None:
    """The ``sae-brainmap`` console script. Errors a user causes (a bad config value, an output folder that
    cannot be written, missing or bad brain data, images, SAE files, checkpoints or backbone weights, an
    activation store made with other settings, an SAE training that diverged; all
    :class:`spikecore.errors.UserError`) are printed as one ``error: ...`` line with exit status 2."""
    from spikecore.errors import UserError

    with user_errors_exit():
        try:
            run(args)
        except (UserError, FileNotFoundError) as err:  # FileNotFoundError: a file the config names
            raise UserError(" ".join(str(err).split())) from None  # one line


if __name__ == "__main__":
    main()
