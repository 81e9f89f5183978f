"""A package's command line: LightningCLI (``fit / validate / test / predict``) plus its own commands.

``run_cli(Module, args, commands={"analyze": fn})`` gives every package the same behaviour:

- ``<pkg> fit --config a.yaml [--config b.yaml] [--trainer.x ...]``: LightningCLI, data module chosen in the
  config by ``class_path`` (any ``LightningDataModule``), ``num_classes`` linked from the data module into
  the model, a checkpoint callback that keeps the best and the last epoch (``--ckpt_path last`` resumes).
- ``<pkg> analyze --config ... --ckpt_path ... [--out DIR]``: builds the same model and data module from
  the config without training, loads the checkpoint safely and hands both to ``fn``. A command given as
  ``(fn, help, add_arguments)`` declares its own options: ``add_arguments(parser)`` adds them to the
  command's ``argparse`` parser, and they reach ``fn`` in its options.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from .checkpoint import load_checkpoint, load_weights


class SpikingCLI(LightningCLI):
    """LightningCLI with the links every spiking classification package needs."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def _trainer_defaults() -> dict:
    return {
        "callbacks": [
            # The learning rate is logged by the module itself ("lr"), so runs without a logger work too.
            ModelCheckpoint(monitor="val/acc", mode="max", save_last=True, filename="best-{epoch}"),
        ],
    }


def make_cli(
    module_class: type[pl.LightningModule], args: Sequence[str] | None, run: bool = True
) -> SpikingCLI:
    return SpikingCLI(
        module_class,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=_trainer_defaults(),
        args=list(args) if args is not None else None,
        run=run,
        auto_configure_optimizers=False,
    )


AnalyzeFn = Callable[[pl.LightningModule, pl.LightningDataModule, argparse.Namespace], dict]
AddArguments = Callable[[argparse.ArgumentParser], None]


def run_cli(
    module_class: type[pl.LightningModule],
    args: Sequence[str] | None = None,
    commands: dict[str, tuple[AnalyzeFn, str] | tuple[AnalyzeFn, str, AddArguments]] | None = None,
) -> object:
    """Entry point of a package's console script. ``commands`` maps extra command names to
    ``(fn, help)`` or ``(fn, help, add_arguments)``; ``fn(model, datamodule, options)`` runs on a model
    restored from ``--ckpt_path``."""
    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    commands = commands or {}
    if args and args[0] in commands:
        fn, help_text, *add_arguments = commands[args[0]]
        return _run_command(module_class, args[0], fn, help_text, args[1:], *add_arguments)
    ckpt = ckpt_path_arg(args)
    if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry"):
        load_checkpoint(ckpt)  # a missing, corrupted or unsafe file: one clear error before any work starts
    return make_cli(module_class, None if from_argv else args)


def console_main(
    module_class: type[pl.LightningModule],
    commands: dict | None = None,
) -> None:
    """A package's console script: :func:`run_cli` on ``sys.argv``, with the errors users cause (a missing
    dataset, a bad checkpoint) printed as one message and exit status 2 instead of a traceback."""
    from ..data.errors import DatasetNotFoundError
    from .checkpoint import CheckpointError

    try:
        run_cli(module_class, None, commands)
    except (DatasetNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def ckpt_path_arg(args: list[str]) -> str | None:
    """The value of ``--ckpt_path`` in a command line, if any."""
    for i, a in enumerate(args):
        if a == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--ckpt_path="):
            return a.split("=", 1)[1]
    return None


def _run_command(
    module_class,
    name: str,
    fn: AnalyzeFn,
    help_text: str,
    args: list[str],
    add_arguments: AddArguments | None = None,
) -> dict:
    ap = argparse.ArgumentParser(prog=name, description=help_text)
    ap.add_argument("--config", action="append", required=True, help="the YAML(s) the model was trained with")
    ap.add_argument("--ckpt_path", help="checkpoint written by fit (without it: the untrained model)")
    ap.add_argument("--out", default=None, help="output folder (default: analysis/ beside the checkpoint)")
    ap.add_argument("--split", choices=("val", "test"), default="val", help="data split to analyse")
    ap.add_argument("--max_batches", type=int, default=8, help="batches of the split to use")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    if add_arguments is not None:
        add_arguments(ap)
    opts, overrides = ap.parse_known_args(args)
    cli_args = [a for c in opts.config for a in ("--config", c)] + overrides
    cli = make_cli(module_class, cli_args, run=False)
    model, dm = cli.model, cli.datamodule
    if opts.ckpt_path:
        load_weights(model, load_checkpoint(opts.ckpt_path), opts.ckpt_path)
    return fn(model, dm, opts)
