"""pycortex's bundled subject S1 as an anatomy for the synthetic subject: the voxels of its ``fullhead``
functional volume that its ROI outlines (V1 ... RSC) cover.

pycortex keeps a user config (``~/.config/pycortex/options.cfg``) whose ``filestore`` can point at a
stale path from another environment; :func:`use_bundled_filestore` points pycortex at the database
installed with it, ``<sys.prefix>/share/pycortex/db``, whenever S1 is needed.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BrainDataError

S1_ROIS = ("V1", "V2", "V3", "OFA", "FFA", "EBA", "PPA", "OPA", "RSC")
S1_XFM = "fullhead"


def bundled_filestore() -> Path:
    return Path(sys.prefix) / "share" / "pycortex" / "db"


def use_bundled_filestore():
    """Import pycortex with its database at the bundled filestore (S1 present); returns the module."""
    import cortex
    from cortex import database

    store = bundled_filestore()
    if not (store / "S1").is_dir():
        raise BrainDataError(f"pycortex's bundled subject S1 not found under {store}: reinstall pycortex")
    if Path(cortex.db.filestore) != store:
        cortex.db.filestore = str(store)
        cortex.db.reload_subjects()
    database.default_filestore = str(store)  # read by the per-subject helpers pycortex builds lazily
    cortex.options.config.set("basic", "filestore", str(store))
    return cortex


@dataclass
class Anatomy:
    """Voxels of a volume grouped by ROI. Voxel indices are (x, y, z) into a NIfTI-ordered array."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # [4, 4] voxel -> world (mm)
    rois: dict[str, np.ndarray]  # name -> [n, 3] int voxel indices; disjoint

    def save(self, path: str | Path) -> None:
        np.savez(path, shape=np.asarray(self.shape), affine=self.affine, names=np.asarray(list(self.rois)),
                 **{f"roi_{k}": v for k, v in self.rois.items()})  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "Anatomy":
        with np.load(path, allow_pickle=False) as f:
            rois = {str(n): f[f"roi_{n}"] for n in f["names"]}
            return cls(tuple(int(s) for s in f["shape"]), f["affine"], rois)


def s1_anatomy(rois=S1_ROIS, cache: str | Path | None = None) -> Anatomy:
    """The ``fullhead`` voxels under each of S1's ROIs. A voxel under several ROIs goes to the one with
    the most of its vertices there. Rasterising the outlines takes pycortex ~10 s: ``cache`` (an
    ``.npz`` path) keeps the result."""
    if cache is not None and Path(cache).is_file():
        a = Anatomy.load(cache)
        if list(a.rois) == list(rois):
            return a
    cortex = use_bundled_filestore()
    verts = cortex.get_roi_verts("S1", roi=list(rois))
    empty = [r for r in rois if len(verts.get(r, [])) == 0]
    if empty:
        raise BrainDataError(
            f"S1 has no vertices for ROI(s) {', '.join(empty)}; choose from {', '.join(S1_ROIS)}"
        )
    xfm = cortex.db.get_xfm("S1", S1_XFM)
    shape = tuple(int(s) for s in xfm.shape[::-1])  # pycortex (z, y, x) -> NIfTI (x, y, z)
    pia, wm = (cortex.db.get_surf("S1", kind, merge=True)[0] for kind in ("pia", "wm"))
    vox = np.rint(xfm((pia + wm) / 2)).astype(np.int64)  # mid-cortex points -> (x, y, z) voxels
    vox = np.clip(vox, 0, np.array(shape) - 1)
    flat = np.ravel_multi_index(vox.T, shape)
    counts = np.zeros((len(rois), int(np.prod(shape))), np.int32)
    for i, r in enumerate(rois):
        np.add.at(counts[i], flat[verts[r]], 1)
    owner = np.where(counts.max(0) > 0, counts.argmax(0), -1)
    out = {r: np.argwhere(owner.reshape(shape) == i) for i, r in enumerate(rois)}
    anatomy = Anatomy(shape, np.asarray(xfm.reference.affine, np.float64), out)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        anatomy.save(cache)
    return anatomy
