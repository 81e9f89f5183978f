"""What the stages share: file names of their outputs, the images, the backbone and SAEs of a run."""

import csv
import warnings
from pathlib import Path

import numpy as np
import torch

from ..run_config import (
    RunConfig,
    RunConfigError,
)

SELECTIVITY_MAPS = "selectivity_maps.npz"  # maps/: the patch maps the selectivity figures draw


RSA_HEATMAPS = "rsa_heatmaps.png"  # analysis/: the ROI-ordered correlation matrices the RSA compares


FSAVERAGE_MAPS = "fsaverage_maps.npz"  # maps/: the fsaverage vectors the surface maps draw (Algonauts)


LATENT_COUNTS = "latent_counts.png"  # analysis/: per ROI, the latents whose best voxel lies there, per layer


# dictionary/similarity_<model>.npz: the streamed statistics of SAE latents and raw residual dimensions
SIMILARITY_INPUTS = (("sae", "sae_codes.npz", "sae_dictionary.npz"),
                     ("neurons", "residual_means.npz", "neuron_dictionary.npz"))  # fmt: skip


TRAINING_IMAGES = "training_split/training_images"  # an Algonauts subject's stimuli


DISPLAY_PX = 224  # images in the selectivity figures are shown at least this large


def _algonauts_dir(c: RunConfig) -> Path:
    return Path(c.brain.algonauts.subject_dir).expanduser()


def _save_layers(path: Path, layer_acts: dict[int, torch.Tensor]) -> None:
    np.savez(path, **{f"layer_{k:02d}": v.float().numpy() for k, v in sorted(layer_acts.items())})


def _load_layers(path: Path) -> dict[int, torch.Tensor]:
    with np.load(path, allow_pickle=False) as f:
        return {int(k.split("_")[1]): torch.from_numpy(f[k]) for k in f.files}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _nsd_image_ids(c: RunConfig) -> np.ndarray:
    """The (sorted, unique) NSD ids of the images in the subject's betas files, those of
    ``brain.nsd.images`` (all, unique or shared): the rows of everything."""
    from ..brain import nsd_image_ids

    n = c.brain.nsd  # betas as .nii.gz or .hdf5; only their headers are read
    betas = [Path(b).expanduser() for b in n.betas]
    return nsd_image_ids(betas, Path(n.expdesign).expanduser(), n.subject, images=n.images)


def _algonauts_images(c: RunConfig) -> list[Path]:
    """The Algonauts training images in response-row order, the first ``max_images`` of them.

    Why image k is response row k: ``training_images`` orders the files by the row number in their names
    (train-0001 is row 0, as the devkit defines it), not by the folder listing, and ``check_row_numbers``
    refuses anything but 1..N (a gap would shift every later image). The brain stage reads its responses
    through ``load_algonauts``, which lists the images with the same function, and checks the two lists
    are equal before it keeps the first ``max_images`` rows."""
    from ..brain.algonauts import check_row_numbers, training_images

    paths = training_images(_algonauts_dir(c))
    check_row_numbers(paths)
    return paths[: c.brain.algonauts.max_images]


def _image_source(c: RunConfig):
    from ..images import EmbeddedImages, FolderImages, ImageFiles, NSDImages

    if c.images.source == "embedded":
        return EmbeddedImages(c.images.n_images, c.images.seed)
    if c.images.source == "algonauts":
        return ImageFiles(_algonauts_images(c))
    if c.images.path is None:
        raise RunConfigError(f"images.source {c.images.source} needs images.path")
    if c.images.source == "folder":
        return FolderImages(Path(c.images.path).expanduser())
    return NSDImages(Path(c.images.path).expanduser(), indices=_nsd_image_ids(c).tolist())


def _backbone(c: RunConfig):
    """The run's backbone (a timm ViT or a spiking model, :func:`~.backbone.build_backbone`) and the warnings
    its construction gave. Random weights (no checkpoint) are drawn from ``backbone.seed``, so that the maps
    stage rebuilds the very network the activations came from. Layers it does not have are a config error."""
    from ..backbone import build_backbone

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(c.backbone.seed)
        bb = build_backbone(c.backbone)
    bad = [lay for lay in c.backbone.layers or [] if not 0 <= lay < bb.depth]
    if bad:
        raise RunConfigError(
            f"backbone.layers {bad} out of range: {bb.name} has {bb.depth} blocks, layers 0..{bb.depth - 1}"
        )
    return bb, [str(w.message) for w in caught]


def _sae_paths(c: RunConfig, layers: list[int]) -> dict[int, Path] | None:
    ck = c.sae.checkpoints
    if ck is None:
        return None
    if isinstance(ck, str):
        return {lay: Path(ck).expanduser() / f"layer_{lay:02d}.safetensors" for lay in layers}
    missing = [lay for lay in layers if lay not in ck]
    if missing:
        raise RunConfigError(f"sae.checkpoints has no SAE for layer(s) {missing}")
    return {lay: Path(ck[lay]).expanduser() for lay in layers}


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)
