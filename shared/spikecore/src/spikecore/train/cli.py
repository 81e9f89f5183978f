"""A package's command line: LightningCLI (``fit / validate / test / predict``) plus its own commands.

``run_cli(Module, args, commands={"analyze": fn})`` gives every package the same behaviour:

- ``<pkg> fit --config a.yaml [--config b.yaml] [--trainer.x ...]``: LightningCLI, data module chosen in the
  config by ``class_path`` (any ``LightningDataModule``), ``num_classes`` linked from the data module into
  the model. Each ``fit`` writes a new run folder (the logger's ``version_N``), with the best epoch and
  ``last.ckpt`` (the state at the end of every epoch) in ``checkpoints/``, and points ``<name>/latest`` at it.
- ``--ckpt_path`` from the command line or from any config file is read by :func:`load_checkpoint` only
  (local files, ``weights_only=True``, checksums and finite values checked), and so is every checkpoint the
  trainer itself restores (:class:`SafeCheckpointIO`). ``--ckpt_path last`` / ``best`` name the newest run's
  checkpoints. The model is rebuilt with the checkpoint's hyper-parameters: a ``--model.*`` option that
  contradicts them is refused; a config-file value that does is reported, and the checkpoint's is used.
- ``<pkg> predict ...`` writes ``predictions.pt`` and ``predictions.csv`` into its run folder.
- ``<pkg> analyze --config ... --ckpt_path ... [--out DIR]``: builds the same model and data module from
  the config without training, loads the checkpoint safely and hands both to ``fn``. A command given as
  ``(fn, help, add_arguments)`` declares its own options: ``add_arguments(parser)`` adds them to the
  command's ``argparse`` parser, and they reach ``fn`` in its options.

Errors a user causes (:class:`spikecore.errors.UserError`: a missing dataset, an unsafe or corrupted
checkpoint, a config value that cannot work, an unwritable output folder) end the console script with one
line and exit status 2.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningCLI

from ..errors import UserError, writable_dir
from ..serialization import is_url, state_dict_mismatch
from .callbacks import PredictionWriter, RunFolder, checkpoint_callbacks, latest_checkpoint, output_root
from .checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint, load_weights

SPECIAL_CKPT = ("last", "best", "hpc", "registry")


class SafeLightningCLI(LightningCLI):
    """LightningCLI whose checkpoints are all read safely, with one run folder per ``fit``.

    Replaces LightningCLI's own reading of ``ckpt_path`` (``_parse_ckpt_path``, which would hand a URL to the
    trainer to download and unpickle) and wraps the trainer's checkpoint I/O in :class:`SafeCheckpointIO`.
    """

    def __init__(self, *args: Any, extra_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        self._extra_commands = extra_commands or {}  # listed in --help beside fit / validate / ...
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # The package's own commands (analyze) run outside LightningCLI (see run_cli), but belong in --help.
        for name, help_text in self._extra_commands.items():
            sub = type(parser)(description=help_text)
            parser._subcommands_action.add_subcommand(name, sub, help=help_text)

    def parse_arguments(self, parser, args) -> None:
        self._argv = (
            [] if isinstance(args, dict | Namespace) else list(sys.argv[1:] if args is None else args)
        )
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        self._preloaded: tuple[str, dict] | None = None
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path is None or ckpt_path in SPECIAL_CKPT:
            return
        if is_url(ckpt_path):
            raise CheckpointError(
                f"ckpt_path {ckpt_path!r} is a URL: checkpoints are never downloaded at run time (a "
                "downloaded checkpoint could run code). Download it yourself and pass the local path."
            )
        ckpt = load_checkpoint(ckpt_path, lightning=True)
        self._preloaded = (str(ckpt_path), ckpt)
        self._apply_checkpoint_hparams(sub, ckpt_path, ckpt)

    def _apply_checkpoint_hparams(self, sub: str, ckpt_path: str, ckpt: dict) -> None:
        """Rebuild the model with the checkpoint's hyper-parameters (what LightningCLI does), but refuse a
        ``--model.*`` option that contradicts them instead of silently ignoring it. The saved values are
        first read in this version's meaning by the module class's ``upgrade_hparams`` (with a note)."""
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        hparams.pop("init_weights", None)  # the checkpoint's own weights replace them
        upgrade = getattr(self.model_class, "upgrade_hparams", None)
        if callable(upgrade) and "_class_path" not in hparams:
            saved, hparams = hparams, upgrade(hparams)
            renamed = {k: (saved.get(k), v) for k, v in hparams.items() if _canon(saved.get(k)) != _canon(v)}
            if renamed:
                listed = ", ".join(
                    f"model.{k}={_show(o)} -> {_show(n)}" for k, (o, n) in sorted(renamed.items())
                )
                print(
                    f"note: {ckpt_path} was saved by an older version; its hyper-parameters read as {listed}",
                    file=sys.stderr,
                )
        model_cfg = self.config[sub].get("model")
        if not hparams or not isinstance(model_cfg, Namespace) or "_class_path" in hparams:
            return
        if "init_weights" in model_cfg:
            model_cfg["init_weights"] = None
        differ = {
            k: (model_cfg[k], v)
            for k, v in hparams.items()
            if k in model_cfg and _canon(model_cfg[k]) != _canon(v)
        }
        given = {
            k for k in differ if any(a == f"--model.{k}" or a.startswith(f"--model.{k}=") for a in self._argv)
        }
        if given:
            listed = ", ".join(
                f"--model.{k} {_show(differ[k][0])} (checkpoint: {_show(differ[k][1])})"
                for k in sorted(given)
            )
            raise CheckpointError(
                f"{listed}: the model is rebuilt with the hyper-parameters saved in {ckpt_path}, so these "
                "options would be ignored. Drop them, or train a model with them."
            )
        if differ:
            listed = ", ".join(f"model.{k}={_show(c)} -> {_show(v)}" for k, (c, v) in sorted(differ.items()))
            print(
                f"note: using the hyper-parameters saved in {ckpt_path} over the config's: {listed}",
                file=sys.stderr,
            )
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"the hyper-parameters saved in {ckpt_path} do not fit this model's options\n")
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, SafeCheckpointIO):
            trainer.strategy.checkpoint_io = SafeCheckpointIO(io)
        if self._preloaded is not None:
            trainer.strategy.checkpoint_io.preload(*self._preloaded)
        return trainer

    # -- before each subcommand: the output folder, `last` / `best`, the checkpoint's fit; before any work --
    def _prepare_run(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.fast_dev_run:  # a file or read-only: refused now
            writable_dir(output_root(self.trainer), "run folder")
        kwargs = self.config_init[self.subcommand]
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            kwargs["ckpt_path"] = ckpt_path = str(self._find_checkpoint(ckpt_path))
            ckpt = load_checkpoint(ckpt_path, lightning=True)
            self.trainer.strategy.checkpoint_io.preload(ckpt_path, ckpt)
        elif self._preloaded is not None:
            ckpt = self._preloaded[1]
        else:
            ckpt = None
        if ckpt is not None:
            check_fits(self.model, ckpt, ckpt_path)
        for cb in self.trainer.callbacks:
            if isinstance(cb, RunFolder):
                cb.resume_from = ckpt_path if self.subcommand == "fit" else None

    def _find_checkpoint(self, which: str) -> Path:
        logger = self.trainer.logger
        root = Path(logger.root_dir) if logger is not None and getattr(logger, "root_dir", None) else None
        last = latest_checkpoint(root) if root is not None else None
        if last is None and root is None:
            candidate = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            last = candidate if candidate.is_file() else None
        where = root if root is not None else Path(self.trainer.default_root_dir) / "checkpoints"
        if last is None:
            raise CheckpointError(
                f"--ckpt_path {which}: no earlier run with a last.ckpt under {where}; "
                "pass the checkpoint's path"
            )
        if which == "last":
            return last
        best = sorted(last.parent.glob("best-*.ckpt"))
        if len(best) != 1:
            raise CheckpointError(
                f"--ckpt_path best: {len(best)} best-*.ckpt files in {last.parent}; pass the path"
            )
        return best[0]

    def before_fit(self) -> None:
        self._prepare_run()

    def before_validate(self) -> None:
        self._prepare_run()

    def before_test(self) -> None:
        self._prepare_run()

    def before_predict(self) -> None:
        self._prepare_run()


class SpikingCLI(SafeLightningCLI):
    """The CLI of the spiking classification packages: ``num_classes`` comes from the data module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def check_fits(model: pl.LightningModule, ckpt: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose ``state_dict`` does not match ``model`` (names, shapes) before any work."""
    # A module that saves only part of itself (no frozen backbone) loads non-strictly, as Lightning does.
    strict = getattr(model, "strict_loading", True)
    detail = state_dict_mismatch(model.state_dict(), ckpt["state_dict"], strict=strict, show=3)
    if detail:
        raise CheckpointError(
            f"{path} does not fit this model ({detail}). Use the config it was trained with."
        )


def _canon(value: Any) -> str:
    def plain(v):
        if isinstance(v, Namespace):
            return {k: plain(x) for k, x in vars(v).items()}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(value), sort_keys=True, default=str)


def _show(value: Any) -> str:
    text = _canon(value)
    return text if len(text) <= 60 else text[:57] + "..."


def trainer_defaults(
    monitor: str | None = "val/acc", mode: str = "max", best_name: str = "best-{epoch}"
) -> dict:
    """Callbacks every package's trainer gets: best and last checkpoints, the run folder, the prediction
    writer. (The learning rate is logged by the modules themselves, so runs without a logger work too.)"""
    return {"callbacks": [*checkpoint_callbacks(monitor, mode, best_name), RunFolder(), PredictionWriter()]}


def make_cli(
    module_class: type[pl.LightningModule],
    args: Sequence[str] | None,
    run: bool = True,
    extra_commands: dict[str, str] | None = None,
) -> SpikingCLI:
    """The LightningCLI of a package. ``--optimizer`` / ``--lr_scheduler`` (any torch optimizer and
    scheduler, by class name or ``class_path``) replace the module's own recipe (its ``configure_optimizers``)
    when given; without them the recipe runs."""
    argv = sys.argv
    if args is not None:  # LightningCLI reads sys.argv (and warns when it is given args beside it)
        sys.argv = [argv[0], *args]
    try:
        return SpikingCLI(
            module_class,
            pl.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults(),
            run=run,
            auto_configure_optimizers=True,
            extra_commands=extra_commands,
        )
    finally:
        sys.argv = argv


def packaged_config(package: str, value: str) -> str:
    """``--config`` by name: a path that exists is kept; otherwise ``demo`` or ``demo.yaml`` names a config
    shipped with ``package`` (``<package>/configs`` in a wheel, ``packages/<name>/configs`` in a checkout)."""
    if Path(value).expanduser().exists() or "/" in value or "\\" in value:
        return value
    import importlib
    import importlib.resources

    module = importlib.import_module(package)
    folders = [importlib.resources.files(package) / "configs"]
    if module.__file__:  # an editable install: the configs sit beside src/
        folders.append(Path(module.__file__).resolve().parents[2] / "configs")
    for folder in folders:
        for name in (value, f"{value}.yaml"):
            candidate = folder / name
            if candidate.is_file():
                return str(candidate)
    return value


def list_packaged_configs(package: str) -> list[str]:
    """Names of the configs shipped with ``package`` (what ``--config NAME`` accepts)."""
    import importlib

    module = importlib.import_module(package)
    names: set[str] = set()
    folders = [importlib.resources.files(package) / "configs"]
    if module.__file__:
        folders.append(Path(module.__file__).resolve().parents[2] / "configs")
    for folder in folders:
        if folder.is_dir():
            names |= {p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")}
    return sorted(names)


def _resolve_configs(package: str, args: list[str]) -> list[str]:
    out, take_next = [], False
    for a in args:
        if take_next:
            a, take_next = packaged_config(package, a), False
        elif a == "--config":
            take_next = True
        elif a.startswith("--config="):
            a = "--config=" + packaged_config(package, a.split("=", 1)[1])
        out.append(a)
    return out


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
    package = module_class.__module__.split(".")[0]
    args = _resolve_configs(package, list(sys.argv[1:] if args is None else args))
    commands = commands or {}
    if args and args[0] in commands:
        fn, help_text, *add_arguments = commands[args[0]]
        return _run_command(module_class, args[0], fn, help_text, args[1:], *add_arguments)
    return make_cli(module_class, args, extra_commands={name: c[1] for name, c in commands.items()})


def console_main(module_class: type[pl.LightningModule], commands: dict | None = None) -> None:
    """A package's console script: :func:`run_cli` on ``sys.argv``, with the errors users cause printed as one
    message and exit status 2 instead of a traceback."""
    with user_errors_exit():
        run_cli(module_class, None, commands)


@contextmanager
def user_errors_exit():
    """``with user_errors_exit(): ...``: a :class:`UserError` becomes ``error: ...`` on stderr, exit 2."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


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
    ap.add_argument(
        "--print_config", action="store_true", help="print this command's options and the config, and exit"
    )
    if add_arguments is not None:
        add_arguments(ap)
    opts, overrides = ap.parse_known_args(args)
    cli_args = [a for c in opts.config for a in ("--config", c)] + overrides
    if opts.print_config:  # its own options as one more YAML section, then LightningCLI's config
        import yaml

        own = {k: v for k, v in vars(opts).items() if k not in ("config", "print_config")}
        print(yaml.safe_dump({name: own}, sort_keys=False), end="")
        make_cli(module_class, [*cli_args, "--print_config"], run=False)  # prints, then exits
    ckpt = load_checkpoint(opts.ckpt_path) if opts.ckpt_path else None
    default_out = Path(opts.ckpt_path).parent / "analysis" if opts.ckpt_path else Path("analysis")
    opts.out = str(
        writable_dir(opts.out or default_out, f"{name} output folder")
    )  # before the work, not after
    cli = make_cli(module_class, cli_args, run=False)
    model, dm = cli.model, cli.datamodule
    if ckpt is not None:
        load_weights(model, ckpt, opts.ckpt_path)
    return fn(model, dm, opts)
