"""Helpers shared by the tdformer tests (uniquely named: all packages' tests share one sys.path)."""

from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Tiny networks of each family for CLI tests (every argument of the real configs, small values).
TINY_ARCH = {
    "spikformer": dict(embed_dim=32, depth=1, num_heads=4),
    "sdt": dict(embed_dim=32, depth=1, num_heads=4),
    "qkformer_hst_2_": dict(embed_dims=(16, 32), depths=(1, 1), num_heads=4),
    "qkformer_hst": dict(embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=4),
}


def tiny_arch_kwargs(arch: str, img_size: int) -> dict:
    backbone = arch.removeprefix("tdformer_")  # the model's name (or an older config's backbone name)
    for prefix, kw in TINY_ARCH.items():
        if backbone.startswith(prefix):
            return dict(kw, img_size=img_size, backend="torch")
    raise KeyError(arch)


def tiny_override(config: Path, tmp_path: Path, **trainer) -> Path:
    """A second config that swaps in a tiny network, the embedded data and a CPU trainer."""
    cfg = yaml.safe_load(config.read_text())
    arch = cfg["model"]["arch"]
    events = "DVS" in cfg["data"]["class_path"] or "Gesture" in cfg["data"]["class_path"]
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
        "trainer": {
            "precision": "32-true",
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            **trainer,
        },
        "model": {"arch_kwargs": tiny_arch_kwargs(arch, size), "T": 4, "segments": 2},
        "data": data,
    }
    path = tmp_path / f"tiny_{config.stem}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def lively(model: torch.nn.Module, x: torch.Tensor, scale: float = 3.0) -> torch.nn.Module:
    """Random tiny networks are nearly silent; calibrate every BatchNorm on ``x`` and scale it by ``scale``
    (3: about a quarter of the neurons fire), then return the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = 1.0  # running stats := this batch's
    model.train()
    with torch.no_grad():
        model(x)
        for bn in bns:
            bn.weight.fill_(scale)
            bn.momentum = 0.1
    return model.eval()
