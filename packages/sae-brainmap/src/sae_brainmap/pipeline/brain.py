"""Stage 2, ``brain``: the synthetic subject on pycortex's S1, NSD betas, or an Algonauts 2023 subject."""

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..run_config import (
    RunConfig,
    algonauts_rois,
)
from .common import _algonauts_dir, _algonauts_images, _load_layers, _nsd_image_ids

# the version of this stage's code: bump it when its outputs change meaning, so that a rerun after
# an upgrade recomputes this stage and those after it (the runner puts it into the stage's hash)
VERSION = 1


def _brain(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    readers = {"synthetic": _synthetic_brain, "nsd": _nsd_brain, "algonauts": _algonauts_brain}
    readers[c.brain.kind](c, root, out, log)
    with np.load(out / "responses.npz", allow_pickle=False) as f:
        log(f"  responses {f['responses'].shape}, {_ceiling_summary(f['ncsnr'], f['n_repeats'])}")
    return [
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    ]


def _ceiling_summary(ncsnr: np.ndarray, n_repeats: np.ndarray) -> str:
    from ..brain import noise_ceiling

    if np.isnan(ncsnr).all():
        return "no noise ceiling"
    return f"median noise ceiling {np.nanmedian(noise_ceiling(ncsnr, float(np.mean(n_repeats)))):.1f}%"


def _synthetic_brain(c: RunConfig, root: Path, out: Path, log) -> None:
    from ..brain.s1 import s1_anatomy
    from ..brain.synthetic import load_synthetic_subject, make_synthetic_subject

    s = c.brain.synthetic
    anatomy = s1_anatomy(rois=tuple(s.rois), cache=out / "s1_anatomy.npz")
    codes = _load_layers(root / "activations" / "sae_codes.npz")
    log(f"  planting a synthetic subject on S1 ({sum(len(v) for v in anatomy.rois.values())} voxels)")
    make_synthetic_subject(codes, out / "subject", anatomy, n_repeats=s.n_repeats, pool=s.pool,
                           ncsnr_range=tuple(s.ncsnr_range), seed=s.seed)  # fmt: skip
    subj = load_synthetic_subject(out / "subject")
    n = codes[next(iter(codes))].shape[0]
    if not np.array_equal(subj.images, np.arange(n)):
        raise RuntimeError("the synthetic subject's images do not match the stimuli")
    np.savez(out / "responses.npz", responses=subj.responses, roi=subj.roi.astype(str),
             voxels=subj.voxels, voxels_full=subj.voxels + subj.offset,
             volume_shape=np.asarray(anatomy.shape),
             ncsnr=subj.ncsnr, n_repeats=np.full(n, s.n_repeats), planted_layer=subj.layer,
             planted_latent=subj.latent, roi_names=np.asarray(list(anatomy.rois)),
             n_latents_total=np.asarray(sum(v.shape[1] for v in codes.values())))  # fmt: skip


def _nsd_brain(c: RunConfig, root: Path, out: Path, log) -> None:
    from ..brain import load_nsd_betas, roi_masks
    from ..brain.nsd import volume_at

    n_cfg = c.brain.nsd
    files = {k: Path(v).expanduser() for k, v in n_cfg.roi_files.items()}
    tables = {k: Path(v).expanduser() for k, v in (n_cfg.label_tables or {}).items()} or None
    masks = roi_masks(files, n_cfg.rois, tables)
    mask = np.any(np.stack([masks[r] for r in n_cfg.rois]), axis=0)
    roi_vol = np.full(mask.shape, "", dtype=object)
    for r in reversed(n_cfg.rois):  # a voxel in several ROIs goes to the first listed
        roi_vol[masks[r]] = r
    log(f"  reading {len(n_cfg.betas)} NSD sessions, {int(mask.sum())} voxels in {len(n_cfg.rois)} ROIs")
    data = load_nsd_betas([Path(b).expanduser() for b in n_cfg.betas], Path(n_cfg.expdesign).expanduser(),
                          n_cfg.subject, mask, zscore_by=n_cfg.zscore_by)  # fmt: skip
    expected = _nsd_image_ids(c)
    keep = np.isin(data.images, expected)  # brain.nsd.images: all, or the unique / shared ones only
    if not keep.all():
        log(f"  brain.nsd.images {n_cfg.images}: {int(keep.sum())} of {len(keep)} images kept")
        data = dataclasses.replace(data, responses=data.responses[keep], images=data.images[keep],
                                   n_repeats=data.n_repeats[keep])  # fmt: skip
    if not np.array_equal(data.images, expected):
        from ..brain.errors import BrainDataError

        raise BrainDataError(
            "the NSD betas and the design list different images for this subject: check that "
            "brain.nsd.betas, brain.nsd.expdesign and brain.nsd.subject belong together"
        )
    if len(data.dropped):
        log(f"  {len(data.dropped)} voxels with constant responses dropped (no correlation is defined)")
    ncsnr = (volume_at(Path(n_cfg.ncsnr).expanduser(), data.voxels, mask.shape, "ncsnr") if n_cfg.ncsnr
             else np.full(len(data.voxels), np.nan))  # fmt: skip
    np.savez(out / "responses.npz", responses=data.responses,
             roi=np.asarray([roi_vol[tuple(v)] for v in data.voxels], dtype=str), voxels=data.voxels,
             voxels_full=data.voxels, volume_shape=np.asarray(mask.shape), ncsnr=ncsnr,
             n_repeats=data.n_repeats, nsd_images=data.images,
             roi_names=np.asarray(n_cfg.rois))  # fmt: skip


def _first_roi(in_roi: np.ndarray, names: list[str]) -> np.ndarray:
    """Each vertex's ROI label: the first listed ROI that holds it ("" for none), as for NSD's voxels."""
    labels = np.full(in_roi.shape[1], "", dtype=object)
    for name, mask in reversed(list(zip(names, in_roi, strict=True))):
        labels[mask] = name
    return labels.astype(str)


def _algonauts_brain(c: RunConfig, root: Path, out: Path, log) -> None:
    """The subject's responses (lh then rh columns, rows in training-image order) at the kept vertices.

    ``vertices`` are challenge-space columns (into ``[V_lh + V_rh]``) and ``roi_masks`` the full ROI masks
    over the challenge space, for the fsaverage maps. There is no noise ceiling: the training split holds
    one response per image, its repeats already averaged, and no ncsnr (``ncsnr`` and ``n_repeats`` are
    NaN: unknown)."""
    from ..brain import load_algonauts
    from ..brain.algonauts import nsd_ids

    a, names = c.brain.algonauts, algonauts_rois(c.brain.algonauts)
    log(f"  reading Algonauts 2023 subject {_algonauts_dir(c)}, {len(names)} ROIs")
    subj = load_algonauts(_algonauts_dir(c), rois=names)
    images = _algonauts_images(c)
    n = json.loads((root / "activations" / "info.json").read_text())["n_images"]
    if subj.images[: len(images)] != images or len(images) != n:
        raise RuntimeError("the Algonauts responses and the activations stage's images are not the same list")
    in_roi = np.stack([subj.rois[r] for r in names])  # [R, V_lh + V_rh]
    for name in (r for r, m in zip(names, in_roi, strict=True) if not m.any()):
        log(f"  ROI {name} has no vertices in this subject's challenge space")
    keep = in_roi.any(0) if a.vertices == "rois" else np.ones(in_roi.shape[1], bool)
    vertices = np.flatnonzero(keep)
    log(f"  {len(vertices)} of {in_roi.shape[1]} challenge-space vertices ({a.vertices}), {n} images")
    np.savez(out / "responses.npz", responses=subj.responses[:n, vertices],
             roi=_first_roi(in_roi[:, vertices], names), roi_names=np.asarray(names), vertices=vertices,
             n_lh=np.asarray(subj.n_lh), roi_masks=in_roi, ncsnr=np.full(len(vertices), np.nan),
             n_repeats=np.full(n, np.nan), nsd_images=nsd_ids(images))  # fmt: skip
