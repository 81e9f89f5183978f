"""``sae-brainmap run``: the whole pipeline, end to end, in resumable stages.

1. ``activations``: stimuli through the ViT (residual streams of the chosen blocks); per layer an SAE
   (loaded, or a small one trained here); per layer the mean over patch tokens of the SAE codes
   ``[N, U]`` and of the raw residual ``[N, 768]``, and the last block's CLS token (the encoding baseline).
2. ``brain``: the synthetic subject on pycortex's S1, planted from those SAE codes, NSD betas, or an
   Algonauts 2023 subject (surface data: challenge-space vertices of fsaverage, no noise ceiling).
3. ``dictionary``: one streamed pass per layer over the latent x voxel similarities (per voxel the best and
   the mean r, per latent the best voxel), the voxel dictionary over SAE latents from it, and a raw-neuron
   one over residual dimensions.
4. ``analysis``: the headline (max and mean similarity over voxels, SAE latents vs raw neurons), RSA, the
   layer hierarchy, the latent -> voxel mapping, the ridge encoding baseline, the synthetic recovery.
5. ``maps``: best layer (max and mean rule), max r, the latent density and two images' dictionary
   activations as pycortex flatmaps (volume data) or on the inflated fsaverage surface (Algonauts 2023),
   with ROI outlines there; per ROI a figure of
   its top latents' top images with their patch-activation maps (the backbone and SAEs rerun on just
   those images: the activations stage keeps only per-image means).
6. ``report``: ``report.md`` with the numbers and the figures.

Each stage is one module of this package (``activations``, ``brain``, ``dictionary``, ``analysis``, ``maps``,
``report``; ``common`` holds what they share); this module, the runner, keeps the books. Each stage writes
into ``<out>/<stage>/`` and ends with ``manifest.json``: a hash of its inputs (its config section, the stamps
of input files, the hashes of the stages it reads, and the version of its code: ``VERSION`` here for the
pipeline's layout, the stage module's own ``VERSION`` for what it computes) and its output files. A stage
whose manifest hash matches and whose outputs all exist is skipped (``rebuild=True``, ``--rebuild``: never).
Arrays are ``.npz`` (no pickle).

Before any stage runs, the config's values, the input files, the number of images and the output folder
are checked (:func:`check_run`): a problem is one error, never a traceback after the ViT has run.
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..run_config import (
    RunConfig,
    algonauts_rois,
    check_image_count,
    check_inputs,
    check_output_folder,
)
from ..store import settings_hash
from . import activations, analysis, brain, dictionary, maps, report
from .activations import _activations
from .analysis import _analysis
from .brain import _brain
from .common import TRAINING_IMAGES, _algonauts_dir, _algonauts_images, _nsd_image_ids
from .dictionary import _dictionary
from .maps import _maps
from .report import _report

# bump when a stage's outputs change meaning (2: seeded random backbone, selectivity figures; 3: streamed
# similarity statistics, the headline, the latent -> voxel mapping)
VERSION = 3


STAGES = ("activations", "brain", "dictionary", "analysis", "maps", "report")


UPSTREAM = {
    "activations": (),
    "brain": ("activations",),
    "dictionary": ("activations", "brain"),
    "analysis": ("activations", "brain", "dictionary"),
    "maps": ("activations", "brain", "dictionary", "analysis"),
    "report": ("activations", "brain", "analysis", "maps"),
}


def _stamp(path: str | None) -> list | None:
    """A file's identity for the hash: path, size, mtime (None for no file)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        stamp = [str(p), sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir())]
        nested = sorted(
            (f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
            for d in p.iterdir() if d.is_dir() for f in d.rglob("*") if f.is_file()
        )  # fmt: skip
        return [*stamp, nested] if nested else stamp  # a folder source's images in subfolders count too
    if p.is_file():
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]
    return [str(p), "missing"]


def _section(c: RunConfig, stage: str) -> dict:
    if stage == "activations":
        sae = c.sae.checkpoints
        stamps = (
            {str(k): _stamp(v) for k, v in sae.items()} if isinstance(sae, dict) else _stamp(sae)
        )  # fmt: skip
        extra = {}
        if c.images.source == "nsd":
            extra = {"design": _stamp(c.brain.nsd.expdesign), "betas": [_stamp(b) for b in c.brain.nsd.betas],
                     "subject": c.brain.nsd.subject, "nsd_images": c.brain.nsd.images}  # fmt: skip
        if c.images.source == "algonauts":
            extra = {"algonauts_images": _stamp(str(_algonauts_dir(c) / TRAINING_IMAGES)),
                     "max_images": c.brain.algonauts.max_images}  # fmt: skip
        return {
            "images": dataclasses.asdict(c.images),
            "images_file": _stamp(c.images.path),
            "backbone": dataclasses.asdict(c.backbone),
            "backbone_file": _stamp(c.backbone.checkpoint),
            "sae": dataclasses.asdict(c.sae),
            "sae_files": stamps,
            **extra,
        }
    if stage == "brain":
        if c.brain.kind == "synthetic":
            return {"kind": "synthetic", "synthetic": dataclasses.asdict(c.brain.synthetic),
                    "subject": c.maps.subject}  # fmt: skip
        if c.brain.kind == "algonauts":
            return _algonauts_brain_section(c)
        n = c.brain.nsd
        files = [*n.betas, n.expdesign, n.ncsnr, *n.roi_files.values(), *(n.label_tables or {}).values()]
        return {"kind": "nsd", "nsd": dataclasses.asdict(n), "files": [_stamp(f) for f in files]}
    if stage == "maps" and c.brain.kind == "algonauts":  # the fsaverage masks are read by this stage
        from ..brain.algonauts import HEMIS, fsaverage_mask_path

        masks = [_stamp(str(fsaverage_mask_path(_algonauts_dir(c), h))) for h in HEMIS]
        return {**dataclasses.asdict(c.maps), "fsaverage_masks": masks}
    if stage in ("dictionary", "analysis", "maps"):
        return dataclasses.asdict(getattr(c, stage))
    return {}


def _algonauts_brain_section(c: RunConfig) -> dict:
    """The Algonauts settings and the stamps of the files the brain stage reads."""
    from ..brain.algonauts import HEMIS, fmri_path, roi_classes_of, roi_mask_path

    a, root = c.brain.algonauts, _algonauts_dir(c)
    classes = roi_classes_of(algonauts_rois(a))
    files = [fmri_path(root, h) for h in HEMIS] + [roi_mask_path(root, h, k) for k in classes for h in HEMIS]
    return {"kind": "algonauts", "algonauts": dataclasses.asdict(a), "files": [_stamp(str(f)) for f in files],
            "images": _stamp(str(root / TRAINING_IMAGES))}  # fmt: skip


class Stage:
    def __init__(self, root: Path, name: str, inputs: dict) -> None:
        self.name, self.dir = name, root / name
        self.hash = settings_hash(inputs)  # the activation store's manifests use the same hash

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def done(self) -> bool:
        if not self.manifest.is_file():
            return False
        m = json.loads(self.manifest.read_text())
        return m.get("hash") == self.hash and all((self.dir / f).exists() for f in m.get("outputs", []))

    def finish(self, outputs: list[str], seconds: float) -> None:
        m = {"stage": self.name, "hash": self.hash, "outputs": sorted(outputs), "seconds": round(seconds, 2)}
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, self.manifest)


def check_run(config: RunConfig) -> Path:
    """Everything that can be checked before the work: the config's values, the input files, enough images
    for the analyses, a writable output folder (created here). Returns the output folder."""
    check_inputs(config)
    if config.images.source != "embedded":
        where = {
            "folder": "images.path",
            "nsd": "brain.nsd.betas",
            "algonauts": "brain.algonauts.subject_dir",
        }
        check_image_count(_count_images(config), config, where[config.images.source])
    return check_output_folder(config)


def _count_images(c: RunConfig) -> int:
    from ..images import FolderImages

    if c.images.source == "folder":
        return len(FolderImages(Path(c.images.path).expanduser()))
    if c.images.source == "algonauts":
        return len(_algonauts_images(c))
    return len(_nsd_image_ids(c))


def run_pipeline(
    config: RunConfig, log: Callable[[str], None] | None = None, rebuild: bool = False
) -> dict[str, str]:
    """Run every stage (skipping those already done, unless ``rebuild``); returns ``{stage: "ran" |
    "skipped"}``. ``log`` gets the progress lines (default: printed)."""
    log = log or functools.partial(print, flush=True)
    root = check_run(config)
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    hashes: dict[str, str] = {}
    status: dict[str, str] = {}
    for i, name in enumerate(STAGES, 1):
        inputs = {
            "version": VERSION,
            "code": _STAGE_MODULES[name].VERSION,  # a stage's code changed: it and those after it rerun
            "section": _section(config, name),
            "upstream": {u: hashes[u] for u in UPSTREAM[name]},
        }
        stage = Stage(root, name, inputs)
        hashes[name] = stage.hash
        if stage.done() and not rebuild:
            log(f"[{i}/{len(STAGES)}] {name}: skipped (outputs match inputs {stage.hash})")
            status[name] = "skipped"
            continue
        log(f"[{i}/{len(STAGES)}] {name}: running")
        stage.dir.mkdir(parents=True, exist_ok=True)
        if stage.manifest.exists():
            stage.manifest.unlink()
        t0 = time.perf_counter()
        outputs = _RUNNERS[name](config, root, stage.dir, log)
        seconds = time.perf_counter() - t0
        stage.finish(outputs, seconds)
        log(f"[{i}/{len(STAGES)}] {name}: done in {seconds:.1f} s")
        status[name] = "ran"
    log(f"report: {root / 'report.md'}")
    return status


_RUNNERS = {
    "activations": _activations,
    "brain": _brain,
    "dictionary": _dictionary,
    "analysis": _analysis,
    "maps": _maps,
    "report": _report,
}
# the module of each stage, whose VERSION (read at each run) is part of the stage's hash
_STAGE_MODULES = {
    "activations": activations,
    "brain": brain,
    "dictionary": dictionary,
    "analysis": analysis,
    "maps": maps,
    "report": report,
}
