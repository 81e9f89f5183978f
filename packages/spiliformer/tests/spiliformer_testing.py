"""Helpers shared by the spiliformer tests (uniquely named: all packages' tests share one sys.path)."""

import contextlib
from pathlib import Path
from unittest import mock

import torch
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Tiny networks of each family (every argument of the real ones, small values).
TINY_ARCH = {
    "spiliformer_2_256_dvs": dict(embed_dims=(16, 32), depths=(1, 1), num_heads=4),
    "spiliformer_4_384": dict(embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=4),
    "spiliformer_10_768": dict(embed_dims=(8, 16, 32), depths=(1, 1, 2), num_heads=4),
}


def tiny_arch_kwargs(arch: str, img_size: int) -> dict:
    return dict(TINY_ARCH[arch], img_size=img_size, backend="torch")


def cpu_trainer(tmp_path: Path, **extra) -> dict:
    """The trainer section of every test config: fp32 on one CPU, writing under ``tmp_path / "runs"``."""
    return {
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(tmp_path / "runs"),
        "enable_progress_bar": False,
        **extra,
    }


def tiny_override(config: Path, tmp_path: Path, **trainer) -> Path:
    """A second config that swaps in a tiny network, the embedded data and a CPU trainer."""
    cfg = yaml.safe_load(config.read_text())
    arch = cfg["model"]["arch"]
    events = "DVS" in cfg["data"]["class_path"] or "Caltech" in cfg["data"]["class_path"]
    size = 32 if events else 16
    common = {"root": str(tmp_path / "data"), "batch_size": 4, "num_workers": 0}
    if events:
        data = {
            "class_path": "spikecore.data.EventDigitsDataModule",
            "init_args": dict(common, T=4, frame_size=size),
        }
    else:
        data = {"class_path": "spikecore.data.DigitsDataModule", "init_args": dict(common, img_size=size)}
    override = {
        "trainer": cpu_trainer(tmp_path, **trainer),
        "model": {"arch_kwargs": tiny_arch_kwargs(arch, size), "T": 4},
        "data": data,
    }
    path = tmp_path / f"tiny_{config.stem}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


# The classes of each paper config's data module (linked into the model by the CLI).
DATASET_CLASSES = {
    "CIFAR10DataModule": 10,
    "CIFAR100DataModule": 100,
    "CIFAR10DVSDataModule": 10,
    "NCaltech101DataModule": 101,
    "ImageNetDataModule": 1000,
}


@contextlib.contextmanager
def weights_not_initialised():
    """Build models without drawing their initial weights (parameters hold whatever memory held): the
    ImageNet model is built in milliseconds instead of seconds, for tests of structure and counts."""
    noop = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    with contextlib.ExitStack() as stack:
        for name in ("kaiming_uniform_", "uniform_", "trunc_normal_", "normal_"):
            stack.enter_context(mock.patch.object(torch.nn.init, name, noop))
        yield


def paper_model(stem: str, **overrides):
    """The SpiLiFormerClassifier a paper config builds (``configs/<stem>.yaml``, its dataset's classes),
    weights not initialised."""
    from spiliformer import SpiLiFormerClassifier
    from spiliformer.convert import config_model_hparams

    path = CONFIGS / f"{stem}.yaml"
    hp = config_model_hparams([path])
    data = yaml.safe_load(path.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    hp.update(num_classes=DATASET_CLASSES[data], **overrides)
    with weights_not_initialised():
        return SpiLiFormerClassifier(**hp)
