"""Natural Scenes Dataset (NSD) volume data: betas, the experimental design, ROIs and the noise ceiling.

Betas: one file per session, ``betas_sessionNN.nii.gz`` or ``betas_sessionNN.hdf5`` (NSD distributes
both for func1pt8mm and func1mm), int16, percent signal change x 300. The NIfTI holds (X, Y, Z, trials),
e.g. (81, 104, 83, 750) for subj01 at 1.8 mm; the HDF5 file, written by MATLAB, holds dataset ``/betas``
which h5py reads with the axes reversed: (trials, Z, Y, X), (750, 83, 104, 81). Both give the same
``[trials, voxels]`` matrix here, voxels in the mask's (X, Y, Z) C order. The HDF5 file is read lazily:
only the mask's bounding box, a block of trials at a time.

``nsd_expdesign.mat`` is 1-based: the image on trial t of subject s is
``subjectim[s - 1, masterordering[t] - 1] - 1`` (a 0-based index into the 73k images of
``nsd_stimuli.hdf5``); an id below 1 is refused, never read as index -1.

Every problem with a file (missing, truncated, corrupted, the wrong shape or layout, ids out of range)
is one :class:`BrainDataError` naming the file, what is wrong and what to do.
"""

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BrainDataError, BrainDataWarning, reading, require_file
from .labels import NSD_LABELS, read_ctab, resolve

NSD_SCALE = 300.0
# 12 runs per session: odd runs show 63 images, even runs 62 (750 trials).
NSD_RUN_LENGTHS = (63, 62) * 6
HDF5_SUFFIXES = (".hdf5", ".h5")
# The HDF5 betas are read this many bytes of the mask's bounding box at a time (all of it for an ROI).
HDF5_BLOCK_BYTES = 1 << 28
DESIGN_FIX = "download nsd_expdesign.mat again (a MATLAB v5 .mat file, read with scipy.io.loadmat)"
# Which of a subject's images: all of them, the subject's own (the design's 1,000 shared images left
# out, as the authors do), or only the shared ones.
NSD_IMAGE_SETS = ("all", "unique", "shared")


@dataclass
class ExpDesign:
    """NSD's design, converted to 0-based indices."""

    masterordering: np.ndarray  # [30000] trial -> column of subjectim
    subjectim: np.ndarray  # [8, 10000] subject x column -> NSD image id
    sharedix: np.ndarray  # [1000] NSD ids of the images all subjects saw

    def __post_init__(self) -> None:
        n_cols, order = self.subjectim.shape[1], self.masterordering
        if len(order) and not 0 <= order.min() <= order.max() < n_cols:
            raise BrainDataError(f"masterordering must be 0-based columns of subjectim (0..{n_cols - 1})")
        if self.subjectim.size and self.subjectim.min() < 0:
            raise BrainDataError("subjectim must hold 0-based image ids (>= 0); NSD's file is 1-based")

    def trial_images(self, subject: int, n_trials: int) -> np.ndarray:
        """NSD image id (0-based) of each of the first ``n_trials`` trials of ``subject`` (1-based)."""
        if not 1 <= subject <= self.subjectim.shape[0]:
            raise BrainDataError(f"subject must be 1..{self.subjectim.shape[0]}, got {subject}")
        if n_trials > len(self.masterordering):
            raise BrainDataError(
                f"{n_trials} trials of betas but the design lists only {len(self.masterordering)} trials"
            )
        return self.subjectim[subject - 1, self.masterordering[:n_trials]]

    def image_set(self, ids: np.ndarray, which: str = "all") -> np.ndarray:
        """The bool mask over ``ids`` (NSD ids, 0-based) of those in ``which`` of :data:`NSD_IMAGE_SETS`:
        ``all``, ``unique`` (not in ``sharedix``) or ``shared`` (in ``sharedix``)."""
        if which not in NSD_IMAGE_SETS:
            raise ValueError(f"which must be one of {', '.join(NSD_IMAGE_SETS)}, got {which!r}")
        ids = np.asarray(ids)
        if which == "all":
            return np.ones(ids.shape, bool)
        shared = np.isin(ids, self.sharedix)
        return shared if which == "shared" else ~shared


def _one_based(p: Path, name: str, values, upper: int | None = None, upper_what: str = "") -> np.ndarray:
    """``values`` of the design's ``name`` as 0-based int64, after checking they are whole numbers in
    ``1..upper``; the first bad entry is named in MATLAB's (1-based) notation."""
    a = np.asarray(values)
    if a.size == 0:
        raise BrainDataError(f"{p}: {name} is empty; {DESIGN_FIX}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise BrainDataError(f"{p}: {name} must be numeric (1-based ids), got {a.dtype}; {DESIGN_FIX}")
    a = a.astype(np.float64)

    def where(bad):
        idx = np.argwhere(bad)[0]
        at = ", ".join(str(i + 1) for i in idx)
        return f"{int(bad.sum())} entries, the first {name}({at}) = {a[tuple(idx)]:g}"

    bad = ~np.isfinite(a) | (a != np.round(a))
    if bad.any():
        raise BrainDataError(f"{p}: {name} must hold whole numbers (1-based ids): {where(bad)}; {DESIGN_FIX}")
    bad = a < 1
    if bad.any():
        raise BrainDataError(
            f"{p}: {name} holds ids below 1: {where(bad)}. NSD's design is 1-based (an id 0 would be "
            f"read as index -1, the last one); use NSD's own nsd_expdesign.mat, or add 1 to a 0-based file"
        )
    bad = a > upper if upper is not None else np.zeros(a.shape, bool)
    if bad.any():
        raise BrainDataError(f"{p}: {name} must be 1..{upper} ({upper_what}): {where(bad)}; {DESIGN_FIX}")
    return a.astype(np.int64) - 1


def load_expdesign(path: str | Path) -> ExpDesign:
    from scipy.io import loadmat

    p = require_file(path, "NSD design file (nsd_expdesign.mat)")
    with reading(p, "NSD design file", fix=DESIGN_FIX):
        mat = loadmat(p)
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing:
        raise BrainDataError(f"{p} lacks {', '.join(missing)}: is it nsd_expdesign.mat?")
    subjectim = np.asarray(mat["subjectim"])
    if subjectim.ndim != 2:
        raise BrainDataError(f"{p}: subjectim must be 2-D (subjects x 10000), got shape {subjectim.shape}")
    subjectim = _one_based(p, "subjectim", subjectim)
    cols = f"the columns of subjectim, which has {subjectim.shape[1]}"
    order = _one_based(p, "masterordering", mat["masterordering"], subjectim.shape[1], cols).ravel()
    return ExpDesign(order, subjectim, _one_based(p, "sharedix", mat["sharedix"]).ravel())


def load_volume(path: str | Path, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file, data in its stored dtype (scaled if its header says so)."""
    import nibabel as nib

    p = require_file(path, what)
    with reading(p, what):
        img = nib.load(p)
        data = np.asarray(img.dataobj)
    return data, img.affine


def volume_at(path: str | Path, voxels: np.ndarray, shape: Sequence[int], what: str = "volume") -> np.ndarray:
    """The values of a 3-D NIfTI volume (e.g. NSD's ``ncsnr.nii.gz``) at ``voxels`` ``[V, 3]``, after
    checking that the volume has ``shape`` (the mask's): ``volume_at(ncsnr, responses.voxels, mask.shape)``
    keeps the values in the responses' voxel order, constant voxels dropped."""
    data, _ = load_volume(path, what)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    _check_shape(path, data.shape, shape)
    return data[tuple(np.asarray(voxels, np.int64).T)]


def _hdf5_betas(f, p: Path):
    if "betas" not in f:
        found = ", ".join(f) or "nothing"
        raise BrainDataError(f"{p} has no dataset '/betas' (found: {found}): is it an NSD betas file?")
    ds = f["betas"]
    if not hasattr(ds, "shape") or len(ds.shape) != 4:
        got = ds.shape if hasattr(ds, "shape") else "a group"
        raise BrainDataError(f"{p}: /betas must be 4-D (trials, Z, Y, X) as in NSD's files, got {got}")
    return ds


def session_trials(path: str | Path) -> int:
    """The number of trials in one betas file (.nii.gz or .hdf5), from its header: no data is read."""
    p = require_file(path, "NSD betas file")
    if p.suffix in HDF5_SUFFIXES:
        import h5py

        with reading(p, "NSD betas file"), h5py.File(p, "r") as f:
            return int(_hdf5_betas(f, p).shape[0])
    import nibabel as nib

    with reading(p, "NSD betas file"):
        shape = nib.load(p).shape
    if len(shape) != 4:
        raise BrainDataError(f"{p}: betas must be 4-D (X, Y, Z, trials), got shape {shape}")
    return int(shape[3])


def nsd_image_ids(
    session_files: Sequence[str | Path], design: ExpDesign | str | Path, subject: int, images: str = "all"
) -> np.ndarray:
    """The sorted unique (0-based) NSD ids of the images shown in ``session_files``: the stimuli to read
    from ``nsd_stimuli.hdf5``, in the order of :func:`load_nsd_betas`'s responses. ``images``: ``all``,
    ``unique`` (the 1,000 shared images left out) or ``shared`` (only those); the responses' rows for
    them are ``np.isin(responses.images, ids)``."""
    design = design if isinstance(design, ExpDesign) else load_expdesign(design)
    n_trials = sum(session_trials(b) for b in session_files)
    ids = np.unique(design.trial_images(subject, n_trials))
    return ids[design.image_set(ids, images)]


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    nz = np.argwhere(mask)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(nz.min(0), nz.max(0), strict=True))


def _read_hdf5_betas(p: Path, mask: np.ndarray) -> np.ndarray:
    """``[trials, V]`` at the mask's voxels, reading only its bounding box, a block of trials at a time."""
    import h5py

    box = _bounding_box(mask)
    inner = mask[box]  # (x, y, z) of the box
    with reading(p, "NSD betas file"), h5py.File(p, "r") as f:
        ds = _hdf5_betas(f, p)
        got = ds.shape[:0:-1]  # (X, Y, Z)
        if tuple(got) != mask.shape:
            hint = ""
            if tuple(ds.shape[1:]) == mask.shape:
                hint = (
                    "; it looks stored (trials, X, Y, Z), but NSD's .hdf5 betas are (trials, Z, Y, X) "
                    "as h5py reads MATLAB's files: write data.transpose(0, 3, 2, 1), or use the .nii.gz"
                )
            raise BrainDataError(
                f"{p}: /betas has shape {tuple(ds.shape)} (trials, Z, Y, X), a volume {tuple(got)} that "
                f"does not match the mask's {mask.shape}{hint}"
            )
        n = ds.shape[0]
        step = max(1, HDF5_BLOCK_BYTES // max(1, inner.size * ds.dtype.itemsize))
        out = np.empty((n, int(inner.sum())), ds.dtype)
        zyx = (box[2], box[1], box[0])
        for t in range(0, n, step):
            block = ds[(slice(t, t + step), *zyx)]  # (t, z, y, x) of the box
            out[t : t + step] = block.transpose(0, 3, 2, 1)[:, inner]
    return out


def read_session_betas(path: str | Path, mask: np.ndarray, scale: float = NSD_SCALE) -> np.ndarray:
    """``[trials, V]`` float32 betas of one session at the voxels where ``mask`` (X, Y, Z) is true, in
    the mask's (C) order, divided by ``scale``: the same matrix from a ``.nii.gz`` and an ``.hdf5``."""
    p = require_file(path, "NSD betas file")
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise BrainDataError(f"the voxel mask {mask.shape} selects no voxels; check the ROI names and files")
    if p.suffix in HDF5_SUFFIXES:
        out = _read_hdf5_betas(p, mask)
    else:
        import nibabel as nib

        with reading(p, "NSD betas file"):
            img = nib.load(p)
        if len(img.shape) != 4:
            raise BrainDataError(f"{p}: betas must be 4-D (X, Y, Z, trials), got shape {img.shape}")
        _check_shape(p, img.shape[:3], mask.shape)
        with reading(p, "NSD betas file"):
            data = np.asarray(img.dataobj)
        out = data[mask].T
    return out.astype(np.float32) / np.float32(scale)


def _check_shape(path, got, want) -> None:
    if tuple(got) != tuple(want):
        raise BrainDataError(
            f"{path}: volume shape {tuple(got)} does not match the mask's {tuple(want)}; are both in the "
            "same space (func1pt8mm or func1mm) and of the same subject?"
        )


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
    voxels: np.ndarray  # [V, 3] (x, y, z) indices of the voxels, in mask order (constant ones left out)
    # [D, 3] (x, y, z) of the mask's voxels left out because their responses are constant (no Pearson r)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))


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
    repeats of each image. ``mask`` (X, Y, Z) bool chooses the voxels, e.g. from :func:`roi_masks`.

    Voxels whose averaged responses are constant over the images (e.g. NSD's zeros outside the brain,
    or a voxel constant within every run, which z-scoring turns into 0) have no Pearson r with anything:
    they are left out, with a :class:`BrainDataWarning` saying how many, and ``voxels`` lists only the
    kept ones (``dropped`` the others), so that per-voxel values stay aligned with their voxels. If every
    voxel is constant, that is a BrainDataError."""
    if zscore_by not in ("run", "session", None):
        raise ValueError(f"zscore_by must be 'run', 'session' or None, got {zscore_by!r}")
    if not session_files:
        raise BrainDataError("no betas files given")
    design = design if isinstance(design, ExpDesign) else load_expdesign(design)
    mask = np.asarray(mask, bool)
    coords = np.argwhere(mask)
    sessions = []
    for path in session_files:
        b = read_session_betas(path, mask, scale)
        bad = ~np.isfinite(b).all(0)
        if bad.any():
            first = tuple(int(c) for c in coords[np.flatnonzero(bad)[0]])
            raise BrainDataError(
                f"{path}: {int(bad.sum())} voxel(s) have NaN or inf betas (first at voxel {first}); "
                "leave them out of the mask"
            )
        if zscore_by == "run" and sum(run_lengths) != b.shape[0]:
            raise BrainDataError(
                f"{path}: run lengths sum to {sum(run_lengths)} trials but the session has {b.shape[0]}; "
                "NSD's sessions have 750 trials in 12 runs (pass run_lengths for other data, or "
                "zscore_by='session')"
            )
        if zscore_by is not None:
            b = zscore(b, run_lengths if zscore_by == "run" else None)
        sessions.append(b)
    betas = np.concatenate(sessions)
    images = design.trial_images(subject, betas.shape[0])
    responses, ids, counts = average_repeats(betas, images)
    constant = np.ptp(responses, axis=0) == 0
    files = f"{session_files[0]}" + (f" and {len(session_files) - 1} more" if len(session_files) > 1 else "")
    if constant.all():
        raise BrainDataError(
            f"all {len(constant)} voxels of the mask have constant responses over the {len(ids)} images of "
            f"{files}: no voxel can be correlated with anything. Is the mask in the betas' space and "
            "inside the brain (NSD's betas are 0 outside it)? Are the betas all zero?"
        )
    if constant.any():
        first = tuple(int(c) for c in coords[np.flatnonzero(constant)[0]])
        warnings.warn(
            BrainDataWarning(
                f"{int(constant.sum())} of {len(constant)} voxels have constant responses over the "
                f"{len(ids)} images of {files} (first at voxel {first}), so no Pearson r: they are left "
                f"out, and the responses keep {int((~constant).sum())} voxels (NSDResponses.voxels; "
                "the left-out ones are NSDResponses.dropped)"
            ),
            stacklevel=2,
        )
    return NSDResponses(responses[:, ~constant], ids, counts, coords[~constant], coords[constant])


def roi_masks(
    roi_files: dict[str, str | Path],
    names: Sequence[str],
    label_tables: dict[str, dict[int, str] | str | Path] | None = None,
) -> dict[str, np.ndarray]:
    """``{name: bool volume}`` for ROI ``names``. ``roi_files`` maps a class (``prf-visualrois``,
    ``floc-faces``, ...) to its ``.nii.gz``; labels come from ``label_tables`` (a dict or a ``.ctab``
    path per class) or NSD's built-in tables. Several names may come from one file; all the files must
    be 3-D volumes of one shape."""
    tables = {}
    for cls in roi_files:
        given = (label_tables or {}).get(cls)
        if given is None and cls not in NSD_LABELS:
            raise BrainDataError(f"no label table for ROI file class {cls!r}; pass label_tables[{cls!r}]")
        tables[cls] = NSD_LABELS[cls] if given is None else given
        tables[cls] = read_ctab(given) if isinstance(given, str | Path) else tables[cls]
    where = resolve(names, tables)
    volumes = {}
    for cls in dict.fromkeys(c for c, _ in where.values()):
        data, _ = load_volume(roi_files[cls], f"ROI file ({cls})")
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise BrainDataError(
                f"ROI file ({cls}) {roi_files[cls]}: expected a 3-D volume, got shape {data.shape}"
            )
        volumes[cls] = data
    shapes = {cls: v.shape for cls, v in volumes.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{cls} {roi_files[cls]} {s}" for cls, s in shapes.items())
        raise BrainDataError(f"ROI files of different volume shapes: {listed}; use one space for all")
    return {name: volumes[cls] == i for name, (cls, i) in where.items()}


def noise_ceiling(ncsnr: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """NSD's noise ceiling in percent of variance for responses averaged over ``n`` repeats:
    ``100 * ncsnr^2 / (ncsnr^2 + 1 / n)``."""
    s2 = np.asarray(ncsnr, np.float64) ** 2
    return 100 * s2 / (s2 + 1 / np.asarray(n, np.float64))
