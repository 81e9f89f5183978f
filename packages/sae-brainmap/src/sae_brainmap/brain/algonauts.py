"""Algonauts 2023 (NSD on fsaverage): ``subjXX/training_split/training_fmri/{lh,rh}_training_fmri.npy``
``[N, V_hemi]`` float32, images ``training_split/training_images/*.png``, ROI masks
``roi_masks/{lh,rh}.<class>_challenge_space.npy`` (label id per vertex of the challenge space) and
``roi_masks/mapping_<class>.npy`` (a pickled dict id -> name; the built-in NSD tables are used unless
``allow_pickle=True``)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BrainDataError, require_file
from .labels import NSD_LABELS, resolve

HEMIS = ("lh", "rh")


@dataclass
class AlgonautsSubject:
    responses: np.ndarray  # [N, V_lh + V_rh] float32, lh first
    n_lh: int  # how many of the columns are left-hemisphere vertices
    images: list[Path]  # the N training images, in row order
    rois: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool [V_lh + V_rh]


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
    fmri = root / "training_split" / "training_fmri"
    parts = [_load_npy(fmri / f"{h}_training_fmri.npy", f"{h} responses") for h in HEMIS]
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
    images = sorted((root / "training_split" / "training_images").glob("*.png"))
    if len(images) != responses.shape[0]:
        raise BrainDataError(f"{len(images)} training images but {responses.shape[0]} trials of responses")
    masks_dir = root / "roi_masks"
    tables = dict(NSD_LABELS)
    if allow_pickle:
        for cls in NSD_LABELS:
            if (masks_dir / f"mapping_{cls}.npy").is_file():
                tables[cls] = read_mapping(masks_dir / f"mapping_{cls}.npy", allow_pickle=True)
    out = {}
    for name, (cls, i) in resolve(rois, tables).items():
        m = [_load_npy(masks_dir / f"{h}.{cls}_challenge_space.npy", f"{h} ROI mask ({cls})") for h in HEMIS]
        if [len(x) for x in m] != [p.shape[1] for p in parts]:
            raise BrainDataError(f"ROI mask {cls} covers {[len(x) for x in m]} vertices but the responses "
                                 f"have {[p.shape[1] for p in parts]} (lh, rh)")  # fmt: skip
        out[name] = np.concatenate(m) == i
    return AlgonautsSubject(responses, parts[0].shape[1], images, out)
