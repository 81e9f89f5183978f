"""Algonauts 2023 (NSD on fsaverage): ``subjXX/training_split/training_fmri/{lh,rh}_training_fmri.npy``
``[N, V_hemi]`` float32, images ``training_split/training_images/train-NNNN_nsd-XXXXX.png`` (NNNN: the
1-based response row, XXXXX: the NSD image id), ROI masks
``roi_masks/{lh,rh}.<class>_challenge_space.npy`` (label id per vertex of the challenge space) and
``roi_masks/mapping_<class>.npy`` (a pickled dict id -> name; the built-in NSD tables are used unless
``allow_pickle=True``).

The challenge space is a subset of fsaverage's vertices:
``roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy`` is a 0/1 vector over fsaverage's 163,842 vertices
of a hemisphere, and the challenge-space columns are the vertices where it is 1, in increasing order
(the Algonauts devkit puts them back with ``fsaverage[np.where(mask)[0]] = values``).
``challenge_to_fsaverage`` does that for both hemispheres."""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BrainDataError, require_file
from .labels import NSD_LABELS, resolve

HEMIS = ("lh", "rh")
FSAVERAGE_VERTICES = 163_842  # per hemisphere (icosahedron order 7)
# train-NNNN_nsd-XXXXX.png: NNNN is the 1-based row of the training responses, XXXXX the NSD image id
TRAINING_IMAGE = re.compile(r"train-(\d+)_nsd-(\d+)\.png")


@dataclass
class AlgonautsSubject:
    responses: np.ndarray  # [N, V_lh + V_rh] float32, lh first
    n_lh: int  # how many of the columns are left-hemisphere vertices
    images: list[Path]  # the N training images, in row order (see training_images)
    rois: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool [V_lh + V_rh]


def fmri_path(subject_dir: str | Path, hemi: str) -> Path:
    return Path(subject_dir) / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy"


def roi_mask_path(subject_dir: str | Path, hemi: str, roi_class: str) -> Path:
    return Path(subject_dir) / "roi_masks" / f"{hemi}.{roi_class}_challenge_space.npy"


def fsaverage_mask_path(subject_dir: str | Path, hemi: str) -> Path:
    return Path(subject_dir) / "roi_masks" / f"{hemi}.all-vertices_fsaverage_space.npy"


def _load_npy(path: Path, what: str, allow_pickle: bool = False):
    require_file(path, what)
    try:
        return np.load(path, allow_pickle=allow_pickle)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise BrainDataError(f"{path}: not a readable .npy file ({e})") from None
        raise BrainDataError(
            f"{path} holds a pickled object (Algonauts' ROI mappings are pickled dicts). Pickles can run "
            "arbitrary code, so they are not read by default: pass allow_pickle=True if you trust the "
            "file, or leave the mapping to the built-in NSD label tables"
        ) from None


def read_mapping(path: str | Path, allow_pickle: bool = False) -> dict[int, str]:
    """An Algonauts ``mapping_<class>.npy`` as ``{id: name}`` (id 0, 'Unknown', left out)."""
    obj = _load_npy(Path(path), "Algonauts ROI mapping", allow_pickle)
    obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    if not isinstance(obj, dict):
        raise BrainDataError(f"{path}: expected a dict id -> name, got {type(obj).__name__}")
    return {int(k): str(v) for k, v in obj.items() if int(k) != 0 and v != "Unknown"}


def training_images(subject_dir: str | Path) -> list[Path]:
    """The subject's ``training_split/training_images/*.png`` in response-row order.

    The order comes from the row number in each name (``train-0001`` is row 0, as the Algonauts devkit
    says), not from the folder's listing order; a name that does not have the Algonauts pattern is
    refused rather than guessed at."""
    folder = Path(subject_dir) / "training_split" / "training_images"
    if not folder.is_dir():
        raise BrainDataError(f"Algonauts training images folder not found: {folder}")
    numbered = []
    for path in folder.glob("*.png"):
        match = TRAINING_IMAGE.fullmatch(path.name)
        if match is None:
            raise BrainDataError(
                f"{path}: not an Algonauts training image name (expected train-NNNN_nsd-XXXXX.png)"
            )
        numbered.append((int(match.group(1)), path))
    return [path for _, path in sorted(numbered)]


def check_row_numbers(images: Sequence[Path]) -> None:
    """The training images must be numbered 1..N: then image i is response row i (a gap or a duplicate
    would shift every later image against its responses)."""
    numbers = [int(TRAINING_IMAGE.fullmatch(Path(p).name).group(1)) for p in images]
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        where = next(i for i, (a, b) in enumerate(zip(numbers, expected, strict=True)) if a != b)
        raise BrainDataError(
            f"the training images are not numbered train-0001 .. train-{len(numbers):04d}: image {where} "
            f"in row order is {Path(images[where]).name}, expected train-{expected[where]:04d}_..."
        )


def nsd_ids(images: Sequence[Path]) -> np.ndarray:
    """The NSD image ids written in the training image names (``nsd-XXXXX``), for provenance."""
    return np.asarray([int(TRAINING_IMAGE.fullmatch(Path(p).name).group(2)) for p in images], np.int64)


def roi_classes_of(names: Sequence[str]) -> list[str]:
    """The ROI classes (mask files) that hold ROI ``names``, from NSD's tables, in first-use order."""
    return list(dict.fromkeys(cls for cls, _ in resolve(names, NSD_LABELS).values()))


def roi_class_names(classes: Sequence[str]) -> list[str]:
    """Every ROI name of the given ROI classes (``prf-visualrois`` -> V1v .. hV4), from NSD's tables."""
    unknown = [c for c in classes if c not in NSD_LABELS]
    if unknown:
        raise BrainDataError(
            f"unknown ROI class(es) {', '.join(map(repr, unknown))}; available: {', '.join(NSD_LABELS)}"
        )
    return [name for c in classes for name in NSD_LABELS[c].values()]


def load_algonauts(
    subject_dir: str | Path,
    rois: Sequence[str] = (),
    allow_pickle: bool = False,
) -> AlgonautsSubject:
    """Training responses of both hemispheres and bool masks for ROI ``names`` (e.g. ``V1v``, ``FFA-1``).

    With ``allow_pickle=True`` the ROI names come from the subject's own ``mapping_<class>.npy``
    files; otherwise from NSD's tables, which those files copy."""
    root = Path(subject_dir)
    if not root.is_dir():
        raise BrainDataError(f"Algonauts subject folder not found: {root}")
    parts = [_load_npy(fmri_path(root, h), f"{h} responses") for h in HEMIS]
    if parts[0].shape[0] != parts[1].shape[0]:
        raise BrainDataError(f"lh has {parts[0].shape[0]} trials but rh has {parts[1].shape[0]}")
    responses = np.concatenate(parts, axis=1).astype(np.float32)
    bad = ~np.isfinite(responses).all(0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise BrainDataError(
            f"{int(bad.sum())} vertices have NaN or inf responses (first: column {first}, "
            f"lh has {parts[0].shape[1]} columns)"
        )
    images = training_images(root)
    if len(images) != responses.shape[0]:
        raise BrainDataError(f"{len(images)} training images but {responses.shape[0]} trials of responses")
    check_row_numbers(images)
    masks_dir = root / "roi_masks"
    tables = dict(NSD_LABELS)
    if allow_pickle:
        for cls in NSD_LABELS:
            if (masks_dir / f"mapping_{cls}.npy").is_file():
                tables[cls] = read_mapping(masks_dir / f"mapping_{cls}.npy", allow_pickle=True)
    out = {}
    for name, (cls, i) in resolve(rois, tables).items():
        m = [_load_npy(roi_mask_path(root, h, cls), f"{h} ROI mask ({cls})") for h in HEMIS]
        if [len(x) for x in m] != [p.shape[1] for p in parts]:
            raise BrainDataError(f"ROI mask {cls} covers {[len(x) for x in m]} vertices but the responses "
                                 f"have {[p.shape[1] for p in parts]} (lh, rh)")  # fmt: skip
        out[name] = np.concatenate(m) == i
    return AlgonautsSubject(responses, parts[0].shape[1], images, out)


def read_fsaverage_masks(subject_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Which fsaverage vertices the challenge space holds: bool ``[163842]`` for lh and rh."""
    masks = []
    for hemi in HEMIS:
        path = fsaverage_mask_path(subject_dir, hemi)
        if not path.is_file():
            raise BrainDataError(
                f"challenge-space mask not found: {path} (no such file). Algonauts 2023 ships it as "
                f"roi_masks/{hemi}.all-vertices_fsaverage_space.npy; without it the challenge-space "
                "vertices cannot be placed on fsaverage"
            )
        m = _load_npy(path, f"{hemi} challenge-space mask")
        if m.shape != (FSAVERAGE_VERTICES,) or not np.isin(m, (0, 1)).all():
            raise BrainDataError(
                f"{path}: expected a 0/1 vector over the {FSAVERAGE_VERTICES:,} fsaverage vertices of a "
                f"hemisphere, got shape {m.shape} with values {np.unique(m)[:5].tolist()}"
            )
        masks.append(m.astype(bool))
    return masks[0], masks[1]


def scatter_to_fsaverage(values, lh_mask: np.ndarray, rh_mask: np.ndarray, fill=np.nan):
    """Challenge-space ``values`` ``[..., V_lh + V_rh]`` (lh first) as ``(lh, rh)``, each
    ``[..., 163842]`` with ``fill`` (NaN: no data) at the vertices outside the challenge space.

    A 2-D ``[N, V]`` array of responses works too, but takes N x 1.3 MB per hemisphere."""
    v = np.asarray(values)
    n_lh, n_rh = int(lh_mask.sum()), int(rh_mask.sum())
    if v.ndim == 0 or v.shape[-1] != n_lh + n_rh:
        raise BrainDataError(
            f"{v.shape[-1] if v.ndim else 0} challenge-space values, but the fsaverage masks select "
            f"{n_lh} + {n_rh} = {n_lh + n_rh} vertices (lh + rh)"
        )
    dtype = np.result_type(v.dtype, np.float32)  # floating, so that NaN can mark "no data"
    out = []
    for part, mask in ((v[..., :n_lh], lh_mask), (v[..., n_lh:], rh_mask)):
        full = np.full((*v.shape[:-1], len(mask)), fill, dtype=dtype)
        full[..., mask] = part  # boolean indexing visits the vertices in increasing order
        out.append(full)
    return out[0], out[1]


def challenge_to_fsaverage(values, subject_dir: str | Path, fill=np.nan):
    """``scatter_to_fsaverage`` with the subject's own ``roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy``.

    Works for responses, per-vertex results (best layer, max r) and the bool ROI masks of
    ``load_algonauts`` (those become float, 1 inside, 0 outside the ROI, ``fill`` off the challenge space)."""
    return scatter_to_fsaverage(values, *read_fsaverage_masks(subject_dir), fill=fill)
