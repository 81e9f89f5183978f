"""The synthetic subject: NSD-format responses planted in an anatomy's ROIs from known (layer, latent) pairs.

Early visual ROIs (V1, V2, V3) follow latents of the early layers, category ROIs (OFA, FFA, EBA, PPA,
OPA, RSC) latents of the late layers. Each ROI draws its voxels' latents from a small pool of its layer,
so voxels of one ROI share tuning (ROI structure for RSA). Trial betas = baseline + signal + Gaussian
noise whose level gives each voxel an ncsnr in a realistic range; every image is shown ``n_repeats``
times, one repeat per session. Written as NSD files (int16 betas x 300 in a volume cropped to the ROIs,
``nsd_expdesign.mat``, a ROI volume with its ``.ctab``, ``ncsnr.nii.gz``) plus ``ground_truth.npz``.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .labels import read_ctab
from .nsd import NSD_SCALE, load_nsd_betas, roi_masks, volume_at
from .s1 import Anatomy

EARLY_ROIS = ("V1", "V2", "V3")
# Where along the layer stack each ROI's latents come from (0 = first layer searched, 1 = last).
ROI_DEPTH = {"V1": 0.0, "V2": 0.1, "V3": 0.2, "OFA": 0.8, "FFA": 1.0, "EBA": 0.8, "PPA": 1.0, "OPA": 0.9,
             "RSC": 0.9}  # fmt: skip


def planted_layer(roi: str, layers: list[int]) -> int:
    depth = ROI_DEPTH.get(roi, 1.0)
    return layers[round(depth * (len(layers) - 1))]


@dataclass
class SyntheticSubject:
    responses: np.ndarray  # [N, V] float32, z-scored per session, repeats averaged
    images: np.ndarray  # [N] stimulus indices (rows of the layer activations)
    roi: np.ndarray  # [V] ROI name of each voxel
    layer: np.ndarray  # [V] planted layer
    latent: np.ndarray  # [V] planted latent
    ncsnr: np.ndarray  # [V]
    voxels: np.ndarray  # [V, 3] voxel indices in the written (cropped) volume
    offset: np.ndarray  # [3] of the crop in the anatomy's volume


def make_synthetic_subject(
    layer_acts: dict[int, Tensor],
    out_dir: str | Path,
    anatomy: Anatomy,
    n_repeats: int = 3,
    pool: int = 6,
    ncsnr_range: tuple[float, float] = (0.2, 1.0),
    seed: int = 0,
) -> Path:
    """Plant responses to the N stimuli of ``layer_acts`` ``{layer: [N, U]}`` and write them under
    ``out_dir``. Returns ``out_dir``."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "roi").mkdir(parents=True, exist_ok=True)
    layers = sorted(layer_acts)
    n = next(iter(layer_acts.values())).shape[0]
    names = list(anatomy.rois)
    vox = np.concatenate([anatomy.rois[r] for r in names])
    roi_of = np.concatenate([[i + 1] * len(anatomy.rois[r]) for i, r in enumerate(names)])
    lo, hi = vox.min(0), vox.max(0) + 1
    shape, local = tuple(int(s) for s in hi - lo), vox - lo
    affine = anatomy.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]  # the crop's corner in world coordinates
    # the plan: per ROI a pool of latents of its layer, each voxel one of them
    layer = np.empty(len(vox), np.int64)
    latent = np.empty(len(vox), np.int64)
    for i, r in enumerate(names):
        lay = planted_layer(r, layers)
        acts = layer_acts[lay]
        live = np.flatnonzero((acts.std(0) > 0).cpu().numpy())
        choice = rng.choice(live, size=min(pool, len(live)), replace=False)
        sel = roi_of == i + 1
        layer[sel], latent[sel] = lay, rng.choice(choice, size=sel.sum())
    signal = np.empty((n, len(vox)), np.float64)
    for lay in layers:
        sel = layer == lay
        a = layer_acts[lay][:, torch.from_numpy(latent[sel])].double().cpu().numpy()
        signal[:, sel] = (a - a.mean(0)) / a.std(0)
    ncsnr = rng.uniform(*ncsnr_range, size=len(vox))  # signal sd / noise sd, as NSD's ncsnr
    baseline = rng.normal(0, 0.5, size=len(vox))
    order = np.concatenate([rng.permutation(n) for _ in range(n_repeats)])  # one repeat per session
    for s in range(n_repeats):
        trials = order[s * n : (s + 1) * n]
        betas = baseline + signal[trials] + rng.normal(size=(n, len(vox))) / ncsnr
        vol = np.zeros((*shape, n), np.int16)
        vol[tuple(local.T)] = np.clip(np.rint(betas * NSD_SCALE), -32768, 32767).T
        _save_nifti(vol, affine, out / f"betas_session{s + 1:02d}.nii.gz")
    _save_design(out / "nsd_expdesign.mat", order, n)
    roi_vol = np.full(shape, -1, np.int16)
    roi_vol[tuple(local.T)] = roi_of
    _save_nifti(roi_vol, affine, out / "roi" / "synthetic-rois.nii.gz")
    (out / "roi" / "synthetic-rois.ctab").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(names)))
    nc = np.zeros(shape, np.float32)
    nc[tuple(local.T)] = ncsnr
    _save_nifti(nc, affine, out / "ncsnr.nii.gz")
    np.savez(out / "ground_truth.npz", voxels=local, roi=np.asarray(names)[roi_of - 1], layer=layer,
             latent=latent, ncsnr=ncsnr, offset=lo)  # fmt: skip
    (out / "ground_truth.json").write_text(json.dumps({
        "layers": layers, "n_images": n, "n_repeats": n_repeats, "seed": seed, "pool": pool,
        "ncsnr_range": list(ncsnr_range),
        "roi_layers": {r: planted_layer(r, layers) for r in names},
        "format": "NSD: betas_sessionNN.nii.gz (int16 x300), nsd_expdesign.mat (subject 1), roi/, ncsnr",
    }, indent=1))  # fmt: skip
    return out


def _save_nifti(data, affine, path) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), path)


def _save_design(path, order, n) -> None:
    from scipy.io import savemat

    subjectim = np.tile(np.arange(1, n + 1), (8, 1))  # stimulus i is "NSD image" i for every subject
    savemat(path, {
        "masterordering": (order + 1)[None].astype(np.double),
        "subjectim": subjectim.astype(np.double),
        "sharedix": np.arange(1, min(n, 1000) + 1)[None].astype(np.double),
    })  # fmt: skip


def load_synthetic_subject(path: str | Path) -> SyntheticSubject:
    """Read a synthetic subject back through the NSD readers, with its ground truth in voxel order."""
    root = Path(path)
    meta = json.loads((root / "ground_truth.json").read_text())
    names = list(read_ctab(root / "roi" / "synthetic-rois.ctab").values())
    files = {"synthetic-rois": root / "roi" / "synthetic-rois.nii.gz"}
    masks = roi_masks(files, names, {"synthetic-rois": root / "roi" / "synthetic-rois.ctab"})
    mask = np.any(np.stack(list(masks.values())), axis=0)
    sessions = [root / f"betas_session{s + 1:02d}.nii.gz" for s in range(meta["n_repeats"])]
    data = load_nsd_betas(sessions, root / "nsd_expdesign.mat", 1, mask, zscore_by="session")
    with np.load(root / "ground_truth.npz", allow_pickle=False) as gt:
        key = {tuple(v): i for i, v in enumerate(gt["voxels"])}
        idx = np.array([key[tuple(v)] for v in data.voxels])
        roi, layer, latent, ncsnr = (gt[k][idx] for k in ("roi", "layer", "latent", "ncsnr"))
        offset = gt["offset"]
    nc = volume_at(root / "ncsnr.nii.gz", data.voxels, mask.shape, "ncsnr")  # the kept voxels' values
    assert np.allclose(nc, ncsnr, atol=1e-6)  # the volume and the ground truth agree
    return SyntheticSubject(data.responses, data.images, roi, layer, latent, ncsnr, data.voxels, offset)
