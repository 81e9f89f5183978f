"""Natural Scenes Dataset (NSD) volume data: betas, the experimental design, ROIs and the noise ceiling.

Betas: ``betas_sessionNN.nii.gz`` (X, Y, Z, 750) int16, or ``.hdf5`` with dataset ``/betas`` stored
time first with the spatial axes reversed (T, Z, Y, X), as NSD's files read through h5py are; both are
percent signal change x 300. ``nsd_expdesign.mat`` is 1-based: the image on trial t of subject s is
``subjectim[s - 1, masterordering[t] - 1] - 1`` (a 0-based index into the 73k images).
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BrainDataError, require_file
from .labels import NSD_LABELS, read_ctab, resolve

NSD_SCALE = 300.0
# 12 runs per session: odd runs show 63 images, even runs 62 (750 trials).
NSD_RUN_LENGTHS = (63, 62) * 6


@dataclass
class ExpDesign:
    """NSD's design, converted to 0-based indices."""

    masterordering: np.ndarray  # [30000] trial -> column of subjectim
    subjectim: np.ndarray  # [8, 10000] subject x column -> NSD image id
    sharedix: np.ndarray  # [1000] NSD ids of the images all subjects saw

    def trial_images(self, subject: int, n_trials: int) -> np.ndarray:
        """NSD image id (0-based) of each of the first ``n_trials`` trials of ``subject`` (1-based)."""
        if not 1 <= subject <= self.subjectim.shape[0]:
            raise BrainDataError(f"subject must be 1..{self.subjectim.shape[0]}, got {subject}")
        if n_trials > len(self.masterordering):
            raise BrainDataError(
                f"{n_trials} trials of betas but the design lists only {len(self.masterordering)} trials"
            )
        return self.subjectim[subject - 1, self.masterordering[:n_trials]]


def load_expdesign(path: str | Path) -> ExpDesign:
    from scipy.io import loadmat

    p = require_file(path, "NSD design file (nsd_expdesign.mat)")
    mat = loadmat(p)
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing:
        raise BrainDataError(f"{p} lacks {', '.join(missing)}: is it nsd_expdesign.mat?")
    order = np.asarray(mat["masterordering"]).ravel().astype(np.int64) - 1
    subjectim = np.atleast_2d(np.asarray(mat["subjectim"])).astype(np.int64) - 1
    if order.min() < 0 or order.max() >= subjectim.shape[1]:
        raise BrainDataError(f"{p}: masterordering must be 1..{subjectim.shape[1]} (1-based)")
    return ExpDesign(order, subjectim, np.asarray(mat["sharedix"]).ravel().astype(np.int64) - 1)


def load_volume(path: str | Path, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file, data in its stored dtype."""
    import nibabel as nib

    img = nib.load(require_file(path, what))
    return np.asarray(img.dataobj), img.affine


def read_session_betas(path: str | Path, mask: np.ndarray, scale: float = NSD_SCALE) -> np.ndarray:
    """``[trials, V]`` float32 betas of one session at the voxels where ``mask`` (X, Y, Z) is true."""
    p = require_file(path, "NSD betas file")
    if p.suffix in (".hdf5", ".h5"):
        import h5py

        with h5py.File(p, "r") as f:
            if "betas" not in f:
                raise BrainDataError(f"{p} has no dataset '/betas' (found: {', '.join(f)})")
            ds = f["betas"]
            _check_shape(p, ds.shape[:0:-1], mask.shape)
            # back to (T, X, Y, Z) so that voxels come in the same (mask) order as from NIfTI
            blocks = (ds[t : t + 64].transpose(0, 3, 2, 1)[:, mask] for t in range(0, ds.shape[0], 64))
            out = np.concatenate(list(blocks))
    else:
        data, _ = load_volume(p, "NSD betas file")
        if data.ndim != 4:
            raise BrainDataError(f"{p}: betas must be 4-D (X, Y, Z, trials), got shape {data.shape}")
        _check_shape(p, data.shape[:3], mask.shape)
        out = data[mask].T
    return out.astype(np.float32) / np.float32(scale)


def _check_shape(path, got, want) -> None:
    if tuple(got) != tuple(want):
        raise BrainDataError(f"{path}: volume shape {tuple(got)} does not match the mask's {tuple(want)}")


def zscore(betas: np.ndarray, run_lengths: Sequence[int] | None = None) -> np.ndarray:
    """Z-score each voxel within each run (``run_lengths``) or over the whole session (None). A voxel
    constant within a block becomes 0 there (no NaN)."""
    n = betas.shape[0]
    bounds = np.cumsum([0, *(run_lengths or [n])])
    if bounds[-1] != n:
        raise BrainDataError(f"run lengths sum to {bounds[-1]} trials but the session has {n}")
    out = np.empty_like(betas, dtype=np.float32)
    for a, b in itertools.pairwise(bounds):
        block = betas[a:b].astype(np.float64)
        sd = block.std(0)
        out[a:b] = np.where(sd > 0, (block - block.mean(0)) / np.where(sd > 0, sd, 1), 0.0)
    return out


def average_repeats(betas: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(responses [n_images, V], image ids [n_images] sorted, repeats per image)``."""
    if len(images) != betas.shape[0]:
        raise BrainDataError(f"{betas.shape[0]} trials of betas but {len(images)} trial image ids")
    ids, inverse, counts = np.unique(images, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    sums = np.add.reduceat(betas[order].astype(np.float64), np.r_[0, np.cumsum(counts)[:-1]])
    return (sums / counts[:, None]).astype(np.float32), ids, counts


@dataclass
class NSDResponses:
    responses: np.ndarray  # [n_images, V] float32, z-scored, repeats averaged
    images: np.ndarray  # [n_images] NSD image ids (0-based), sorted
    n_repeats: np.ndarray  # [n_images]
    voxels: np.ndarray  # [V, 3] (x, y, z) indices of the voxels, in mask order


def load_nsd_betas(
    session_files: Sequence[str | Path],
    design: ExpDesign | str | Path,
    subject: int,
    mask: np.ndarray,
    zscore_by: str | None = "run",
    run_lengths: Sequence[int] = NSD_RUN_LENGTHS,
    scale: float = NSD_SCALE,
) -> NSDResponses:
    """Read sessions in order, z-score per ``"run"`` or ``"session"`` (or not: None), and average the
    repeats of each image. ``mask`` (X, Y, Z) bool chooses the voxels, e.g. from :func:`roi_masks`."""
    if zscore_by not in ("run", "session", None):
        raise ValueError(f"zscore_by must be 'run', 'session' or None, got {zscore_by!r}")
    if not session_files:
        raise BrainDataError("no betas files given")
    design = design if isinstance(design, ExpDesign) else load_expdesign(design)
    mask = np.asarray(mask, bool)
    sessions = []
    for path in session_files:
        b = read_session_betas(path, mask, scale)
        bad = ~np.isfinite(b).all(0)
        if bad.any():
            first = tuple(int(c) for c in np.argwhere(mask)[np.flatnonzero(bad)[0]])
            raise BrainDataError(
                f"{path}: {int(bad.sum())} voxel(s) have NaN or inf betas (first at voxel {first}); "
                "leave them out of the mask"
            )
        if zscore_by is not None:
            b = zscore(b, run_lengths if zscore_by == "run" else None)
        sessions.append(b)
    betas = np.concatenate(sessions)
    images = design.trial_images(subject, betas.shape[0])
    responses, ids, counts = average_repeats(betas, images)
    return NSDResponses(responses, ids, counts, np.argwhere(mask))


def roi_masks(
    roi_files: dict[str, str | Path],
    names: Sequence[str],
    label_tables: dict[str, dict[int, str] | str | Path] | None = None,
) -> dict[str, np.ndarray]:
    """``{name: bool volume}`` for ROI ``names``. ``roi_files`` maps a class (``prf-visualrois``,
    ``floc-faces``, ...) to its ``.nii.gz``; labels come from ``label_tables`` (a dict or a ``.ctab``
    path per class) or NSD's built-in tables. Several names may come from one file."""
    tables = {}
    for cls in roi_files:
        given = (label_tables or {}).get(cls)
        if given is None and cls not in NSD_LABELS:
            raise BrainDataError(f"no label table for ROI file class {cls!r}; pass label_tables[{cls!r}]")
        tables[cls] = NSD_LABELS[cls] if given is None else given
        tables[cls] = read_ctab(given) if isinstance(given, str | Path) else tables[cls]
    where = resolve(names, tables)
    volumes = {
        cls: load_volume(roi_files[cls], f"ROI file ({cls})")[0] for cls in {c for c, _ in where.values()}
    }
    return {name: volumes[cls] == i for name, (cls, i) in where.items()}


def noise_ceiling(ncsnr: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """NSD's noise ceiling in percent of variance for responses averaged over ``n`` repeats:
    ``100 * ncsnr^2 / (ncsnr^2 + 1 / n)``."""
    s2 = np.asarray(ncsnr, np.float64) ** 2
    return 100 * s2 / (s2 + 1 / np.asarray(n, np.float64))
