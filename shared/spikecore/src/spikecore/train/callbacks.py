"""The callbacks every package's ``fit / validate / test / predict`` runs with.

- :func:`checkpoint_callbacks`: the best epoch by a monitored metric, and ``last.ckpt`` rewritten at the end
  of every epoch (Lightning's own ``save_last`` rewrites it only when a new best is saved).
- :class:`RunFolder`: a ``fit`` never writes into a folder that holds an earlier run's checkpoints, and
  ``<save_dir>/<name>/latest`` points at the newest run (``runs/<name>/latest/checkpoints/last.ckpt`` is
  always the newest model).
- :class:`PredictionWriter`: ``predict`` writes what it computed (``predictions.pt``, ``predictions.csv``) and
  says where.
"""

import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from ..errors import UserError

LATEST = "latest"


class RunFolderError(UserError, ValueError):
    """A run would write into a folder that already holds another run's checkpoints."""


def checkpoint_callbacks(
    monitor: str | None, mode: str = "max", best_name: str = "best-{epoch}"
) -> list[Callback]:
    """The best checkpoint by ``monitor`` (none without a monitor) first, so ``--ckpt_path best`` finds it,
    then ``last.ckpt``: one file, the state at the end of every training epoch."""
    last = ModelCheckpoint(
        filename="last",
        save_top_k=1,
        monitor=None,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    if monitor is None:
        return [last]
    return [ModelCheckpoint(monitor=monitor, mode=mode, filename=best_name, save_top_k=1), last]


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder this run writes into (the same on every rank): the logger's version folder, or
    ``default_root_dir`` without a logger."""
    return Path(trainer.log_dir or trainer.default_root_dir)  # fast_dev_run's dummy logger has no folder


def output_root(trainer: pl.Trainer) -> Path:
    """The folder all runs of this configuration write under (not the version folder: naming it fixes it)."""
    logger = trainer.logger
    for attr in ("root_dir", "save_dir"):
        value = getattr(logger, attr, None) if logger is not None else None
        if value:
            return Path(value)
    return Path(trainer.default_root_dir)


def last_checkpoint(trainer: pl.Trainer) -> Path:
    """Where this run's ``last.ckpt`` is (written at the end of every training epoch)."""
    return run_dir(trainer) / "checkpoints" / "last.ckpt"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def latest_checkpoint(experiment: Path) -> Path | None:
    """``<experiment>/latest/checkpoints/last.ckpt`` if the pointer and the file exist."""
    last = experiment / LATEST / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


class RunFolder(Callback):
    """Checked when ``fit`` starts, before anything is written: the run's ``checkpoints/`` folder must be
    new (or hold the checkpoint being resumed), so no later run silently writes ``last-v1.ckpt`` beside an
    older model. Then ``<experiment>/latest`` is pointed at this run's folder (a relative symlink)."""

    def __init__(self) -> None:
        self.resume_from: str | None = None  # set by the CLI before fit

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fast_dev_run:  # fast_dev_run writes nothing
            return
        folder = run_dir(trainer)
        ckpts = folder / "checkpoints"
        earlier = sorted(ckpts.glob("*.ckpt")) if ckpts.is_dir() else []
        resuming = self.resume_from is not None and _inside(Path(self.resume_from), ckpts)
        if earlier and not resuming:
            raise RunFolderError(
                f"{ckpts} already holds checkpoints of an earlier run "
                f"({', '.join(p.name for p in earlier[:3])}"
                f"{' ...' if len(earlier) > 3 else ''}); a new fit would sit beside them under other names. "
                "Let the logger number runs (remove the fixed `version` from trainer.logger), choose another "
                "--trainer.default_root_dir, resume with --ckpt_path, or delete that folder."
            )
        numbered = isinstance(trainer.logger, TensorBoardLogger | CSVLogger)
        if trainer.is_global_zero and numbered and folder.name != LATEST:
            point_latest(folder)


def point_latest(folder: Path) -> None:
    """Make ``folder.parent / latest`` a relative symlink to ``folder`` (atomically replaced)."""
    link = folder.parent / LATEST
    if link.exists() and not link.is_symlink():  # a real folder of an older fixed-version run: left as it is
        print(
            f"note: {link} is an earlier run's folder, not a pointer; this run writes to {folder}",
            file=sys.stderr,
        )
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{LATEST}.{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(folder.name, target_is_directory=True)
        tmp.replace(link)
    except OSError as err:  # e.g. a file system without symlinks
        print(f"note: could not point {link} at {folder}: {err}", file=sys.stderr)


class PredictionWriter(BasePredictionWriter):
    """``predict``'s outputs to ``<run folder>/predictions.pt`` (every tensor the module returned,
    concatenated in dataset order) and ``predictions.csv`` (index, predicted class, its probability)."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if predictions and isinstance(predictions[0], list):  # several dataloaders: keep the first
            predictions = predictions[0]
        if not predictions:
            return
        merged = _concat(predictions)
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        rank = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        pt = folder / f"predictions{rank}.pt"
        torch.save(merged, pt)
        written = [pt]
        if isinstance(merged, dict) and "pred" in merged:
            csv = folder / f"predictions{rank}.csv"
            pred = merged["pred"].tolist()
            prob = merged["probs"].max(-1).values.tolist() if "probs" in merged else [""] * len(pred)
            csv.write_text(
                "index,pred,prob\n"
                + "".join(f"{i},{c},{p}\n" for i, (c, p) in enumerate(zip(pred, prob, strict=True)))
            )
            written.append(csv)
        print(
            f"predictions of {len(_first(merged))} samples written to {', '.join(map(str, written))}",
            file=sys.stderr,
        )


def _concat(items: list[Any]) -> Any:
    if isinstance(items[0], dict):
        return {k: torch.cat([it[k].detach().cpu() for it in items]) for k in items[0]}
    return torch.cat([it.detach().cpu() for it in items])


def _first(merged: Any) -> torch.Tensor:
    return next(iter(merged.values())) if isinstance(merged, dict) else merged
