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

Each stage writes into ``<out>/<stage>/`` and ends with ``manifest.json``: a hash of its inputs (its config
section, the stamps of input files, the hashes of the stages it reads) and its output files. A stage whose
manifest hash matches and whose outputs all exist is skipped (``rebuild=True``, ``--rebuild``: never).
Arrays are ``.npz`` (no pickle).

Before any stage runs, the config's values, the input files, the number of images and the output folder
are checked (:func:`check_run`): a problem is one error, never a traceback after the ViT has run.
"""

import csv
import dataclasses
import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .run_config import (
    RunConfig,
    RunConfigError,
    algonauts_rois,
    check_image_count,
    check_inputs,
    check_output_folder,
)
from .store import settings_hash

# bump when a stage's outputs change meaning (2: seeded random backbone, selectivity figures; 3: streamed
# similarity statistics, the headline, the latent -> voxel mapping)
VERSION = 3
STAGES = ("activations", "brain", "dictionary", "analysis", "maps", "report")
SELECTIVITY_MAPS = "selectivity_maps.npz"  # maps/: the patch maps the selectivity figures draw
RSA_HEATMAPS = "rsa_heatmaps.png"  # analysis/: the ROI-ordered correlation matrices the RSA compares
FSAVERAGE_MAPS = "fsaverage_maps.npz"  # maps/: the fsaverage vectors the surface maps draw (Algonauts)
LATENT_COUNTS = "latent_counts.png"  # analysis/: per ROI, the latents whose best voxel lies there, per layer
# dictionary/similarity_<model>.npz: the streamed statistics of SAE latents and raw residual dimensions
SIMILARITY_INPUTS = (("sae", "sae_codes.npz", "sae_dictionary.npz"),
                     ("neurons", "residual_means.npz", "neuron_dictionary.npz"))  # fmt: skip
TRAINING_IMAGES = "training_split/training_images"  # an Algonauts subject's stimuli
DISPLAY_PX = 224  # images in the selectivity figures are shown at least this large
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
        from .brain.algonauts import HEMIS, fsaverage_mask_path

        masks = [_stamp(str(fsaverage_mask_path(_algonauts_dir(c), h))) for h in HEMIS]
        return {**dataclasses.asdict(c.maps), "fsaverage_masks": masks}
    if stage in ("dictionary", "analysis", "maps"):
        return dataclasses.asdict(getattr(c, stage))
    return {}


def _algonauts_dir(c: RunConfig) -> Path:
    return Path(c.brain.algonauts.subject_dir).expanduser()


def _algonauts_brain_section(c: RunConfig) -> dict:
    """The Algonauts settings and the stamps of the files the brain stage reads."""
    from .brain.algonauts import HEMIS, fmri_path, roi_classes_of, roi_mask_path

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
    from .images import FolderImages

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


# ----------------------------------------------------------------------------------------------------
# helpers


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
    from .brain import nsd_image_ids

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
    from .brain.algonauts import check_row_numbers, training_images

    paths = training_images(_algonauts_dir(c))
    check_row_numbers(paths)
    return paths[: c.brain.algonauts.max_images]


def _image_source(c: RunConfig):
    from .images import EmbeddedImages, FolderImages, ImageFiles, NSDImages

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
    from .backbone import build_backbone

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


# ----------------------------------------------------------------------------------------------------
# stages


def _activations(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .checkpoint import load_sae, save_sae
    from .module import train_sae

    bb, messages = _backbone(c)
    for message in messages:
        log(f"  warning: {message}")
    layers = list(range(bb.depth)) if c.backbone.layers is None else sorted(set(c.backbone.layers))
    last = bb.depth - 1
    source = _image_source(c)
    n = len(source)
    paths = _sae_paths(c, layers)
    saes = {lay: load_sae(p) for lay, p in paths.items()} if paths else None
    for lay, sae in (saes or {}).items():  # before any image: an SAE of another width fails at encode
        if sae.config.d_in != bb.layer_dim(lay):
            raise RunConfigError(
                f"sae.checkpoints: the SAE for layer {lay} ({paths[lay]}) takes {sae.config.d_in}-dim input, "
                f"but {bb.name}'s residual stream is {bb.layer_dim(lay)}-dim: use SAEs trained on this "
                "backbone"
            )
    log(f"  {n} images at {bb.img_size[0]} px through {bb.name}, layers {layers}")
    resid_mean = {lay: [] for lay in layers}
    codes: dict[int, list] = {lay: [] for lay in layers}
    tokens: dict[int, list] = {lay: [] for lay in layers}
    cls = []
    t0 = time.perf_counter()
    for start in range(0, n, c.images.batch_size):
        idx = range(start, min(n, start + c.images.batch_size))
        x = torch.stack([bb.preprocess(source[i]) for i in idx])
        streams = bb(x, sorted(set(layers) | {last}))
        cls.append(bb.embedding(streams[last]).float())  # a ViT's CLS token, a spiking model's token mean
        for lay in layers:
            patch = bb.select_tokens(streams[lay], "patch").float()
            resid_mean[lay].append(patch.mean(1))
            if saes is None:
                tokens[lay].append(patch)
            else:
                with torch.no_grad():
                    z = saes[lay].encode(patch.reshape(-1, patch.shape[-1]))
                codes[lay].append(z.reshape(*patch.shape[:2], -1).mean(1))
        log(f"  images {idx[-1] + 1}/{n} ({time.perf_counter() - t0:.0f} s)")
    silent = [lay for lay in layers if not torch.cat(resid_mean[lay]).any()]
    if silent:  # nothing for an SAE to learn: a spiking network with random weights does not fire
        raise RunConfigError(
            f"backbone {bb.name}: layer(s) {silent} are zero on every image (silent neurons); give a trained "
            "backbone.checkpoint"
        )
    metrics = {}
    if saes is None:
        saes = {}
        (out / "saes").mkdir(exist_ok=True)
        for lay in layers:
            t = torch.cat(tokens[lay])  # [N, T, d]
            flat = t.reshape(-1, t.shape[-1])
            sae = train_sae(flat, kind=c.sae.kind, n_latents=c.sae.n_latents, k=c.sae.k, lr=c.sae.lr,
                            batch_size=c.sae.batch_size, epochs=-1, max_steps=c.sae.steps,
                            seed=c.sae.seed + lay, layer=lay, backbone=bb.name, tokens="patch",
                            progress=False)  # fmt: skip
            with torch.no_grad():
                z = sae.encode(flat)
                x_hat = sae.decode(z)
            fve = 1 - ((flat - x_hat) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
            metrics[lay] = {"fve": float(fve), "l0": float((z > 0).sum(1).float().mean()),
                            "dead_fraction": float(((z > 0).sum(0) == 0).float().mean())}  # fmt: skip
            codes[lay] = [z.reshape(*t.shape[:2], -1).mean(1)]
            save_sae(sae, out / "saes" / f"layer_{lay:02d}.safetensors")
            tokens[lay] = []
            log(f"  SAE layer {lay}: trained {c.sae.steps} steps, FVE {metrics[lay]['fve']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    _save_layers(out / "sae_codes.npz", {lay: torch.cat(v) for lay, v in codes.items()})
    _save_layers(out / "residual_means.npz", {lay: torch.cat(v) for lay, v in resid_mean.items()})
    np.savez(out / "final_embedding.npz", cls=torch.cat(cls).numpy(), layer=np.asarray(last))
    first = [source[i] for i in c.maps.images if i < n]
    from PIL import Image

    for i, img in zip(c.maps.images, first, strict=False):
        Image.fromarray(img).resize((128, 128)).save(out / f"stimulus_{i:04d}.png")
    info = {"n_images": n, "layers": layers, "img_size": list(bb.img_size), "backbone": bb.name,
            "backbone_kind": bb.kind, "random_backbone": c.backbone.checkpoint is None,
            "sae_trained_here": paths is None,
            "sae_metrics": {str(k): v for k, v in metrics.items()}}  # fmt: skip
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return [
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    ]


def _brain(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    readers = {"synthetic": _synthetic_brain, "nsd": _nsd_brain, "algonauts": _algonauts_brain}
    readers[c.brain.kind](c, root, out, log)
    with np.load(out / "responses.npz", allow_pickle=False) as f:
        log(f"  responses {f['responses'].shape}, {_ceiling_summary(f['ncsnr'], f['n_repeats'])}")
    return [
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    ]


def _ceiling_summary(ncsnr: np.ndarray, n_repeats: np.ndarray) -> str:
    from .brain import noise_ceiling

    if np.isnan(ncsnr).all():
        return "no noise ceiling"
    return f"median noise ceiling {np.nanmedian(noise_ceiling(ncsnr, float(np.mean(n_repeats)))):.1f}%"


def _synthetic_brain(c: RunConfig, root: Path, out: Path, log) -> None:
    from .brain.s1 import s1_anatomy
    from .brain.synthetic import load_synthetic_subject, make_synthetic_subject

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
    from .brain import load_nsd_betas, roi_masks
    from .brain.nsd import volume_at

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
        from .brain.errors import BrainDataError

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
    from .brain import load_algonauts
    from .brain.algonauts import nsd_ids

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


def _dictionary(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .analysis.similarity_stats import save_similarity_stats, similarity_stats
    from .dictionary import build_voxel_dictionary

    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        responses, roi = torch.from_numpy(f["responses"]).float(), f["roi"]
    d = c.dictionary
    kw = {"centered": d.centered, "one_to_one": d.one_to_one, "candidates": d.candidates}
    built = {}
    for model, codes, name in SIMILARITY_INPUTS:
        acts = _load_layers(root / "activations" / codes)
        # One streamed pass over each layer's [latents, voxels] similarities: every voxel's best latent (the
        # dictionary) and mean r (the mean rule), every latent's best voxel (the latent -> voxel mapping).
        stats = similarity_stats(acts, responses, centered=d.centered)
        save_similarity_stats(out / f"similarity_{model}.npz", stats)
        built[model] = build_voxel_dictionary(acts, responses, **kw, similarity=stats)
        built[model].save(out / name)
    sae, raw = built["sae"], built["neurons"]
    log(f"  {sae.n_voxels} voxels: median r SAE latents {sae.r.median():.3f}, "
        f"residual dims {raw.r.median():.3f}")  # fmt: skip
    rows = [[v, roi[v], int(sae.layer[v]), int(sae.latent[v]), f"{float(sae.r[v]):.4f}", int(raw.layer[v]),
             int(raw.latent[v]), f"{float(raw.r[v]):.4f}"] for v in range(sae.n_voxels)]  # fmt: skip
    header = ["voxel", "roi", "layer", "latent", "r", "neuron_layer", "neuron", "neuron_r"]
    _write_csv(out / "dictionary.csv", header, rows)
    stats = [f"similarity_{model}.npz" for model, _, _ in SIMILARITY_INPUTS]
    return ["sae_dictionary.npz", "neuron_dictionary.npz", "dictionary.csv", *stats]


def _no_ceiling_note(c: RunConfig) -> str:
    why = (
        "Algonauts 2023's training split holds one averaged response per image and no ncsnr"
        if c.brain.kind == "algonauts"
        else "no brain.nsd.ncsnr given"
    )
    return f"No noise ceiling ({why}): R^2 over the noise ceiling is not available."


def _algonauts_unavailable() -> list[str]:
    """What the report leaves out for Algonauts 2023, and why."""
    return [
        "Noise ceiling: the training split gives one response per image, its repeats already averaged, and "
        "no ncsnr; so no R^2 over the noise ceiling for the encoding baseline, and no split by ncsnr.",
        "Recovery of planted latents: only the synthetic subject has known (layer, latent) pairs.",
    ]


def _median_order_ok(medians: dict[str, float], planted: dict[str, int]) -> bool:
    """Whether, for every pair of ROIs planted at layers a < b, median best layer(a) <= median(b)."""
    names = list(medians)
    return all(
        medians[x] <= medians[y] for x in names for y in names if planted[x] < planted[y]
    )  # fmt: skip


def _analysis(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .analysis import (
        best_layer,
        headline,
        latent_mapping,
        latents_per_roi,
        layer_scores,
        load_similarity_stats,
        ridge_encoding,
        roi_layer_counts,
        roi_selectivity,
        roi_selectivity_per_layer,
        rsa,
    )
    from .analysis.similarity_stats import HEADLINE_HEADER, headline_rows
    from .brain import noise_ceiling
    from .dictionary import VoxelDictionary
    from .figures import latent_count_figure, save_figure

    a = c.analysis
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        brain = {k: f[k] for k in f.files}
    responses = brain["responses"].astype(np.float64)
    roi = brain["roi"]
    rois = [str(r) for r in brain["roi_names"]]
    codes = _load_layers(root / "activations" / "sae_codes.npz")
    layers = sorted(codes)
    sae = VoxelDictionary.load(root / "dictionary" / "sae_dictionary.npz")
    raw = VoxelDictionary.load(root / "dictionary" / "neuron_dictionary.npz")
    sims = {m: load_similarity_stats(root / "dictionary" / f"similarity_{m}.npz")
            for m, _, _ in SIMILARITY_INPUTS}  # fmt: skip
    numbers: dict = {"n_images": int(responses.shape[0]), "n_voxels": int(responses.shape[1]),
                     "layers": layers, "rois": rois}  # fmt: skip

    # RSA on voxels that have a match in both dictionaries and are not constant
    ok = (sae.latent.numpy() >= 0) & (raw.latent.numpy() >= 0) & (responses.std(0) > 0)
    ok &= (sae.activations.numpy().std(0) > 0) & (raw.activations.numpy().std(0) > 0)
    idx = np.flatnonzero(ok)
    rng = np.random.default_rng(a.seed)
    if a.rsa_max_voxels is not None and len(idx) > a.rsa_max_voxels:  # None: all voxels (the authors')
        idx = np.sort(rng.choice(idx, a.rsa_max_voxels, replace=False))
    numbers["rsa"] = {"n_voxels": len(idx), "permutations": a.rsa_permutations}
    for name, d in (("sae_dictionary", sae), ("neuron_baseline", raw)):
        res = rsa(responses[:, idx], d.activations.numpy()[:, idx], a.rsa_permutations, a.seed)
        numbers["rsa"][name] = {"rho": res.rho, "p_value": res.p_value}
        log(f"  RSA {name}: rho {res.rho:.3f}, p {res.p_value:.4f}")
    (out / RSA_HEATMAPS).unlink(missing_ok=True)  # none stale from an earlier run
    if len(idx):
        _rsa_heatmaps(out / RSA_HEATMAPS, responses[:, idx], sae, raw, idx, roi[idx], rois, numbers["rsa"])
        log(f"  RSA heat maps {RSA_HEATMAPS}")

    # hierarchy
    resp_t = torch.from_numpy(responses)
    hier: dict = {}
    per_voxel = {}
    for rule in ("max", "mean"):
        scores = layer_scores(sims["sae"], rule=rule)  # the dictionary stage's streamed statistics
        best = best_layer(scores, layers)
        counts = roi_layer_counts(best, roi, rois, layers)
        per_voxel[f"best_layer_{rule}"], per_voxel[f"score_{rule}"] = best, scores.max(0)
        hier[rule] = {
            "roi_layer_counts": {r: counts[i].tolist() for i, r in enumerate(rois)},
            "median_best_layer": {r: float(np.median(best[roi == r])) for r in rois},
        }
        _write_csv(out / f"roi_layer_counts_{rule}.csv", ["roi", *[f"layer_{lay}" for lay in layers]],
                   [[r, *counts[i].tolist()] for i, r in enumerate(rois)])  # fmt: skip
    lpr = latents_per_roi(sae.layer.numpy(), sae.latent.numpy(), roi, rois, layers)
    hier["latents_per_roi"] = {r: lpr[i].tolist() for i, r in enumerate(rois)}
    _write_csv(out / "latents_per_roi.csv", ["roi", *[f"layer_{lay}" for lay in layers]],
               [[r, *lpr[i].tolist()] for i, r in enumerate(rois)])  # fmt: skip
    dict_layer = sae.layer.numpy()
    hier["dictionary_median_layer"] = {
        r: float(np.median(dict_layer[(roi == r) & (dict_layer >= 0)])) for r in rois
    }  # fmt: skip
    numbers["hierarchy"] = hier

    # the paper's headline (max and mean over voxels of the best r: SAE latents vs raw neurons) and the
    # authors' latent -> voxel mapping (each latent's best voxel: counts per ROI and layer, density per voxel)
    numbers["headline"] = headline(sims, roi, rois, n_images=responses.shape[0])
    _write_csv(out / "headline.csv", HEADLINE_HEADER, headline_rows(numbers["headline"]))
    s_all, n_all = (numbers["headline"][m]["all_layers"] for m in ("sae", "neurons"))
    log(f"  headline: SAE latents max r {_fmt(s_all['max'])}, mean {_fmt(s_all['mean'])}; "
        f"raw neurons max {_fmt(n_all['max'])}, mean {_fmt(n_all['mean'])}")  # fmt: skip
    mapping = latent_mapping(sims["sae"], roi, rois)
    numbers["latent_mapping"] = mapping.numbers()
    _write_csv(out / "latent_roi_layer_counts.csv", ["roi", *[f"layer_{lay}" for lay in layers]],
               [[r, *mapping.roi_layer_counts[i].tolist()] for i, r in enumerate(rois)]
               + [["(outside the ROIs)", *mapping.outside.tolist()],
                  ["(no best voxel)", *mapping.unassigned.tolist()]])  # fmt: skip
    save_figure(latent_count_figure(mapping), out / LATENT_COUNTS, dpi=120)
    np.savez(out / "per_voxel.npz", max_r=sae.r.numpy(), latent_density=mapping.density.sum(0),
             latent_density_layers=mapping.density, layers=np.asarray(layers), **per_voxel)  # fmt: skip

    # ROI-consistent selectivity: each ROI's top latents by mean r over its voxels, with their top images
    sel = roi_selectivity(codes, resp_t, roi, rois, top_latents=a.selectivity_latents,
                          top_images=a.selectivity_images)  # fmt: skip
    numbers["selectivity"] = {
        r: [{"layer": e.layer, "latent": e.latent, "mean_r": e.mean_r, "top_images": e.top_images,
             "top_activations": e.top_activations} for e in entries]
        for r, entries in sel.items()
    }  # fmt: skip
    numbers["roi_voxels"] = {r: int((roi == r).sum()) for r in rois}
    (out / "selectivity_per_layer.csv").unlink(missing_ok=True)  # none stale from an earlier run
    if a.selectivity_per_layer:  # the authors' ranking: each layer's own top latents per ROI
        ranked = roi_selectivity_per_layer(codes, resp_t, roi, rois, top_latents=a.selectivity_per_layer)
        numbers["selectivity_per_layer"] = {
            r: {str(lay): [{"latent": u, "mean_r": m} for u, m in entries]
                for lay, entries in by_layer.items()}
            for r, by_layer in ranked.items()
        }  # fmt: skip
        _write_csv(out / "selectivity_per_layer.csv", ["roi", "layer", "rank", "latent", "mean_r"],
                   [[r, lay, i, u, f"{m:.4f}"] for r, by_layer in ranked.items()
                    for lay, entries in by_layer.items() for i, (u, m) in enumerate(entries)])  # fmt: skip

    # the encoding baseline: ridge from the final embedding
    with np.load(root / "activations" / "final_embedding.npz", allow_pickle=False) as f:
        feats = f["cls"].astype(np.float64)
    n = feats.shape[0]
    perm = rng.permutation(n)
    n_test = max(3, round(a.test_fraction * n))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    ncsnr = brain["ncsnr"]
    ceiling = (
        None if np.isnan(ncsnr).all() else noise_ceiling(ncsnr, float(np.mean(brain["n_repeats"][test])))
    )
    enc = ridge_encoding(feats[train], responses[train], feats[test], responses[test], ceiling)
    numbers["encoding"] = {
        "n_train": len(train), "n_test": len(test),
        "median_r2": float(np.nanmedian(enc.r2)), "mean_r2": float(np.nanmean(enc.r2)),
        "median_r2_over_ceiling": (None if enc.r2_over_ceiling is None
                                   else float(np.nanmedian(enc.r2_over_ceiling))),
        "median_noise_ceiling_pct": None if ceiling is None else float(np.nanmedian(ceiling)),
        "noise_ceiling_note": None if ceiling is not None else _no_ceiling_note(c),
        "per_roi_median_r2": {r: float(np.nanmedian(enc.r2[roi == r])) for r in rois},
    }  # fmt: skip
    if c.brain.kind == "algonauts":
        numbers["unavailable"] = _algonauts_unavailable()
    log(f"  ridge encoding: median held-out R^2 {numbers['encoding']['median_r2']:.3f}")

    # the synthetic subject: recovery of the planted (layer, latent) and of the planted layer order
    if "planted_layer" in brain:
        pl_, pt = brain["planted_layer"], brain["planted_latent"]
        hit = (dict_layer == pl_) & (sae.latent.numpy() == pt)
        planted = {r: int(pl_[roi == r][0]) for r in rois}
        medians = hier["dictionary_median_layer"]
        strong = ncsnr > 0.5
        numbers["synthetic"] = {
            "recovered_fraction": float(hit.mean()),
            "chance_fraction": 1 / float(brain["n_latents_total"]),
            "recovered_fraction_ncsnr_gt_0.5": float(hit[strong].mean()) if strong.any() else None,
            "layer_recovered_fraction": float((dict_layer == pl_).mean()),
            "per_roi_recovered": {r: float(hit[roi == r].mean()) for r in rois},
            "planted_layer": planted,
            "median_best_layer": medians,
            "median_follows_planted_order": _median_order_ok(medians, planted),
        }  # fmt: skip
        log(f"  synthetic recovery: {hit.mean():.3f} of voxels; per-ROI order "
            f"{'follows' if numbers['synthetic']['median_follows_planted_order'] else 'does NOT follow'} "
            "the planted one")  # fmt: skip
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))
    return [p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json"]


def _rsa_heatmaps(path: Path, brain: np.ndarray, sae, raw, idx: np.ndarray, roi: np.ndarray,
                  rois: list[str], numbers: dict) -> None:  # fmt: skip
    """The brain's, the SAE dictionary's and the raw-neuron baseline's voxel x voxel correlation matrices
    over the RSA's voxels (``idx``), side by side and ordered by ROI."""
    from .figures import RSAPanel, rsa_heatmap_figure, save_figure

    def model(title: str, d, key: str) -> RSAPanel:
        return RSAPanel(title, d.activations.numpy()[:, idx], numbers[key]["rho"], numbers[key]["p_value"])

    panels = [RSAPanel("brain responses", brain), model("SAE voxel dictionary", sae, "sae_dictionary"),
              model("raw-neuron baseline", raw, "neuron_baseline")]  # fmt: skip
    save_figure(rsa_heatmap_figure(panels, roi, rois), path, dpi=120)


def _maps(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    for old in [*out.glob("*.png"), out / SELECTIVITY_MAPS, out / FSAVERAGE_MAPS]:  # nothing stale
        old.unlink(missing_ok=True)
    if c.brain.kind == "algonauts":
        maps, notes = _fsaverage_maps(c, root, out, log)
    else:
        maps, notes = _flatmaps(c, root, out, log), []
    selectivity = _selectivity_figures(c, root, out, log) if c.maps.selectivity_figures else {}
    summary = {"maps": maps, "selectivity": selectivity, "notes": notes}
    (out / "maps.json").write_text(json.dumps(summary, indent=1))
    written = [f for f in (SELECTIVITY_MAPS, FSAVERAGE_MAPS) if (out / f).is_file()]
    return ["maps.json", *maps, *(f for f in selectivity.values() if f), *written]


@dataclasses.dataclass
class MapSpec:
    """One cortical map: a value per voxel (or vertex) and how to colour it."""

    name: str  # the PNG's stem
    values: np.ndarray  # [V]
    title: str
    cmap: str
    label: str
    vmin: float | None = None
    vmax: float | None = None


def _z_over_images(acts: np.ndarray, i: int) -> np.ndarray:
    """Image ``i``'s dictionary activations as z-scores over the images (0 where a voxel is constant)."""
    mu, sd = acts.mean(0), acts.std(0)
    return np.where(sd > 0, (acts[i] - mu) / np.where(sd > 0, sd, 1), 0.0)


def _map_specs(c: RunConfig, root: Path, log) -> list[MapSpec]:
    """Best layer, max r and ``maps.images``' dictionary activations, per voxel: what every map draws."""
    from .dictionary import VoxelDictionary

    with np.load(root / "analysis" / "per_voxel.npz", allow_pickle=False) as f:
        best, best_mean, max_r = f["best_layer_max"], f["best_layer_mean"], f["max_r"]
        density = f["latent_density"]
    sae = VoxelDictionary.load(root / "dictionary" / "sae_dictionary.npz")
    layers = list(sae.layers)
    lo, hi = min(layers), max(layers)
    specs = [
        MapSpec("best_layer", best, "best layer (max rule)", "viridis", "layer", lo, hi),
        MapSpec("best_layer_mean", best_mean, "best layer (mean rule)", "viridis", "layer", lo, hi),
        MapSpec("max_r", max_r, "max r (voxel dictionary)", "magma", "Pearson r"),
        # the latent -> voxel density, on a log scale: a few voxels collect many latents
        MapSpec("latent_density", np.log10(1 + density), "latent -> voxel: latents whose best voxel it is "
                "(all layers)", "inferno", "log10(1 + latents)", 0.0,
                max(1.0, float(np.log10(1 + density.max())))),
    ]  # fmt: skip
    acts = sae.activations.numpy()
    for i in c.maps.images:
        if i >= acts.shape[0]:
            log(f"  maps.images: image {i} out of range ({acts.shape[0]} images), skipped")
            continue
        title = f"dictionary activation, image {i}"
        specs.append(MapSpec(f"activation_image_{i:04d}", _z_over_images(acts, i), title, "RdBu_r",
                             "z over images", -3, 3))  # fmt: skip
    return specs


def _flatmaps(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    """The maps on the subject's pycortex flatmap (volume data), with the subject's ROIs outlined."""
    from .maps import flatmap_png

    if not c.maps.enabled or c.maps.subject is None:
        log("  flatmaps disabled (maps.enabled false or no maps.subject)")
        return []
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        vox, shape = f["voxels_full"], tuple(int(s) for s in f["volume_shape"])
        roi, names = f["roi"], [str(r) for r in f["roi_names"]]
    rois = {r: roi == r for r in names if (roi == r).any()}
    made = []
    for m in _map_specs(c, root, log):
        path = flatmap_png(m.values, vox, shape, out / f"{m.name}.png", m.title, subject=c.maps.subject,
                           xfm=c.maps.xfm, cmap=m.cmap, vmin=m.vmin, vmax=m.vmax, label=m.label,
                           rois=rois)  # fmt: skip
        made.append(path.name)
        log(f"  map {path.name}")
    return made


def _fsaverage_masks_or_note(c: RunConfig, n_challenge: int, log) -> tuple[tuple | None, list[str]]:
    """The subject's challenge-space masks over fsaverage, or None and the note that says why not (a
    missing or malformed ``all-vertices_fsaverage_space.npy``): the run goes on without surface maps."""
    from .brain import BrainDataError
    from .brain.algonauts import read_fsaverage_masks, scatter_to_fsaverage

    try:
        masks = read_fsaverage_masks(_algonauts_dir(c))
        scatter_to_fsaverage(np.zeros(n_challenge), *masks)  # the masks must select the responses' columns
    except BrainDataError as err:
        log(f"  fsaverage maps skipped: {err}")
        return None, [f"No fsaverage maps: {err}"]
    return masks, []


def _fsaverage_maps(c: RunConfig, root: Path, out: Path, log) -> tuple[list[str], list[str]]:
    """The maps on the inflated fsaverage surface (Algonauts 2023), with the ROIs outlined, and notes.

    Values of the kept vertices go back into the challenge space (NaN elsewhere), then onto fsaverage's
    163,842 vertices per hemisphere (NaN off the challenge space), which ``fsaverage_png`` draws on
    fsaverage5; the vectors drawn are kept in ``fsaverage_maps.npz`` (``<map>_lh``, ``<map>_rh``)."""
    from .brain.algonauts import scatter_to_fsaverage
    from .surface import fsaverage_png

    if not c.maps.enabled:
        log("  fsaverage maps disabled (maps.enabled false)")
        return [], []
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        vertices, roi_masks, roi_names = f["vertices"], f["roi_masks"], [str(r) for r in f["roi_names"]]
    masks, notes = _fsaverage_masks_or_note(c, roi_masks.shape[1], log)
    if masks is None:
        return [], notes
    in_rois = zip(roi_names, roi_masks, strict=True)
    outlines = {r: scatter_to_fsaverage(m, *masks) for r, m in in_rois if m.any()}
    made, drawn = [], {}
    for m in _map_specs(c, root, log):
        challenge = np.full(roi_masks.shape[1], np.nan, np.float32)
        challenge[vertices] = m.values
        lh, rh = scatter_to_fsaverage(challenge, *masks)
        path = fsaverage_png(lh, rh, out / f"fsaverage_{m.name}.png", title=m.title, cmap=m.cmap, vmin=m.vmin,
                             vmax=m.vmax, label=m.label, views=c.maps.views, rois=outlines)  # fmt: skip
        drawn[f"{m.name}_lh"], drawn[f"{m.name}_rh"] = lh, rh
        made.append(path.name)
        log(f"  map {path.name}")
    np.savez_compressed(out / FSAVERAGE_MAPS, **drawn)
    return made, notes


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _selectivity_requests(selectivity: dict) -> list[tuple[int, int, int]]:
    """Every (layer, latent, image) drawn in some ROI's figure, once."""
    return sorted(
        {
            (e["layer"], e["latent"], i)
            for entries in selectivity.values()
            for e in entries
            for i in e["top_images"]
        }
    )


def _run_saes(c: RunConfig, root: Path, layers: list[int]) -> dict:
    """The SAEs the activations stage used: the configured checkpoints or the ones it trained."""
    from .checkpoint import load_sae

    paths = _sae_paths(c, layers) or {
        lay: root / "activations" / "saes" / f"layer_{lay:02d}.safetensors" for lay in layers
    }
    return {lay: load_sae(p) for lay, p in paths.items()}


def _check_patch_maps(selectivity: dict, maps: dict, log) -> None:
    """A patch map's mean is the per-image code the analysis ranked by: if they differ, the backbone,
    SAEs or images are not the ones the activations stage used (say so rather than draw silently)."""
    worst = 0.0
    for entries in selectivity.values():
        for e in entries:
            for image, stored in zip(e["top_images"], e["top_activations"], strict=True):
                got = float(maps[(e["layer"], e["latent"], image)].mean())
                worst = max(worst, abs(got - stored) / (1e-3 + abs(stored)))
    if worst > 1e-3:
        log(
            f"  warning: patch maps do not reproduce the stored activations (relative difference "
            f"{worst:.2g}): the backbone, SAEs or images differ from the activations stage's"
        )


def _activity_note(n_active: int) -> str:
    if n_active == 0:
        return "silent on every image"
    return f"active on {n_active} image{'s' if n_active > 1 else ''} only"


def _selectivity_rows(entries: list[dict], shown: dict, maps: dict) -> list:
    """Figure rows. A sparse latent may fire on fewer images than its top-image count: the images where
    it is silent are left out (a "top image" it does not fire on would mislead) and the title says so."""
    from .figures import LatentRow

    rows = []
    for e in entries:
        active = [i for i, a in zip(e["top_images"], e["top_activations"], strict=True) if a > 0]
        ids = active or list(e["top_images"])
        note = "" if len(active) == len(e["top_images"]) else _activity_note(len(active))
        patch_maps = [maps[(e["layer"], e["latent"], i)] for i in ids]
        rows.append(
            LatentRow(e["layer"], e["latent"], e["mean_r"], ids, [shown[i] for i in ids], patch_maps, note)
        )
    return rows


def _selectivity_arrays(key: str, entries: list[dict], maps: dict) -> dict[str, np.ndarray]:
    """Every top image's patch map (silent ones included) for ``selectivity_maps.npz``. Maps on a coarser
    grid than the ROI's finest (the later stages of a multi-stage spiking backbone) are repeated onto it,
    each token over the cells it covers, which keeps every map's mean."""
    grids = [[maps[(e["layer"], e["latent"], i)] for i in e["top_images"]] for e in entries]
    rows, cols = max(m.shape[0] for g in grids for m in g), max(m.shape[1] for g in grids for m in g)
    grids = [[m[np.arange(rows) * m.shape[0] // rows][:, np.arange(cols) * m.shape[1] // cols] for m in g]
             for g in grids]  # fmt: skip
    return {
        f"maps_{key}": np.asarray(grids, np.float32),
        f"images_{key}": np.asarray([e["top_images"] for e in entries]),
    }


def _selectivity_figures(c: RunConfig, root: Path, out: Path, log) -> dict[str, str | None]:
    """Per ROI ``selectivity_<ROI>.png`` (None: an ROI without voxels) and ``selectivity_maps.npz`` with
    the patch maps drawn (``maps_<ROI>`` ``[latents, images, rows, cols]``, ``images_<ROI>``)."""
    from .analysis.selectivity import latent_patch_maps
    from .figures import display_image, save_figure, selectivity_figure

    numbers = json.loads((root / "analysis" / "numbers.json").read_text())
    selectivity = numbers["selectivity"]
    for roi in (r for r, entries in selectivity.items() if not entries):
        log(f"  selectivity: ROI {roi} has no voxels, so no top latents and no figure")
    requests = _selectivity_requests(selectivity)
    if not requests:
        return dict.fromkeys(selectivity)
    bb, _ = _backbone(c)  # its random-weights warning was logged by the activations stage
    source = _image_source(c)
    if len(source) != numbers["n_images"]:
        raise RuntimeError(
            f"the image source now has {len(source)} images; the run used {numbers['n_images']}"
        )
    layers = sorted({lay for lay, _, _ in requests})
    images = sorted({i for _, _, i in requests})
    log(f"  selectivity: patch tokens of {len(images)} top images, layers {layers}")
    # at most 16 images a batch: full-size codes are 16 x 196 tokens x 12,288 latents = 150 MB per layer
    batch_size = min(c.images.batch_size, 16)
    maps = latent_patch_maps(bb, _run_saes(c, root, layers), source, requests, batch_size=batch_size)
    _check_patch_maps(selectivity, maps, log)
    scale = max(1.0, DISPLAY_PX / min(bb.img_size))
    crop = {k: bb.preprocessing[k] for k in ("crop_pct", "crop_mode")}  # the region the backbone sees
    size = tuple(round(s * scale) for s in bb.img_size)
    shown = {i: display_image(source[i], size, **crop) for i in images}
    weights = " (RANDOM weights)" if c.backbone.checkpoint is None else ""
    subtitle = f"{bb.name} at {bb.img_size[0]} px{weights}; overlay: the latent's activation per patch"
    figures: dict[str, str | None] = {}
    arrays: dict[str, np.ndarray] = {}
    for roi, entries in selectivity.items():
        if not entries:
            figures[roi] = None
            continue
        rows = _selectivity_rows(entries, shown, maps)
        fig = selectivity_figure(roi, rows, subtitle, n_voxels=numbers["roi_voxels"][roi])
        figures[roi] = save_figure(fig, out / f"selectivity_{_file_safe(roi)}.png").name
        arrays.update(_selectivity_arrays(_file_safe(roi), entries, maps))
        log(f"  figure {figures[roi]}")
    np.savez(out / SELECTIVITY_MAPS, **arrays)
    return figures


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _selectivity_figure_links(figures: dict[str, str | None], rois: list[str]) -> list[str]:
    """Markdown for the selectivity figures, in ROI order (none when the figures are switched off)."""
    if not figures:
        return []
    lines = ["", "Each ROI's top latents (rows) on their top images, with the latent's patch-activation map "
             "laid over each image:", ""]  # fmt: skip
    for roi in rois:
        name = figures.get(roi)
        lines += [f"![{roi}: top latents and their top images](maps/{name})" if name else
                  f"*{roi}: no voxels, no figure.*", ""]  # fmt: skip
    return lines


def _rsa_heatmap_lines(root: Path) -> list[str]:
    """Markdown for the RSA heat maps (none when there were too few voxels to draw them)."""
    if not (root / "analysis" / RSA_HEATMAPS).is_file():
        return []
    return ["Voxel x voxel correlations over images, voxels ordered by ROI (the matrices the RSA compares):",
            "", f"![RSA: ROI-ordered voxel x voxel correlations](analysis/{RSA_HEATMAPS})", ""]  # fmt: skip


def _encoding_lines(e: dict, rois: list[str]) -> list[str]:
    ceiling = (
        f"; median R^2 / noise ceiling {_fmt(e['median_r2_over_ceiling'])} "
        f"(median ceiling {_fmt(e['median_noise_ceiling_pct'])}%)."
        if e.get("noise_ceiling_note") is None
        else f". {e['noise_ceiling_note']}"
    )
    lines = ["", "## Encoding baseline (ridge from the last layer's CLS; a spiking model's token mean)", "",
             f"{e['n_train']} training / {e['n_test']} held-out images: median R^2 {_fmt(e['median_r2'])}, "
             f"mean {_fmt(e['mean_r2'])}{ceiling}", "", "| ROI | median R^2 |", "|---|---|"]  # fmt: skip
    return lines + [f"| {q} | {_fmt(e['per_roi_median_r2'][q])} |" for q in rois]


def _map_lines(root: Path, maps: list[str], notes: list[str], kind: str) -> list[str]:
    """The maps section: each PNG (a dictionary activation with its stimulus), and the maps' notes."""
    if not maps and not notes:
        return []
    lines = ["", "## Maps", ""]
    if kind == "algonauts" and maps:
        lines += ["On the inflated fsaverage surface (nilearn's fsaverage5: the challenge-space vertices "
                  "among its 10,242 per hemisphere; grey: no data), ROIs outlined.", ""]  # fmt: skip
    lines += [f"*{note}*" for note in notes] + ([""] if notes else [])
    for m in maps:
        lines.append(f"![{m}](maps/{m})")
        stim = root / "activations" / f"stimulus_{m.split('_')[-1].split('.')[0]}.png"
        if "activation_image" in m and stim.is_file():
            lines.append(f"![stimulus](activations/{stim.name})")
        lines.append("")
    return lines


def _report(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .report_sections import headline_lines, latent_mapping_lines, selectivity_per_layer_lines

    numbers = json.loads((root / "analysis" / "numbers.json").read_text())
    info = json.loads((root / "activations" / "info.json").read_text())
    maps_json = json.loads((root / "maps" / "maps.json").read_text())
    maps, selectivity_figures = maps_json["maps"], maps_json.get("selectivity", {})
    unit = "challenge-space vertices" if c.brain.kind == "algonauts" else "voxels"
    layers, rois = numbers["layers"], numbers["rois"]
    L: list[str] = ["# SAE-BrainMap run report", ""]
    L += [f"- backbone: `{info['backbone']}` at {info['img_size'][0]} px, layers {layers}"
          + (" — **random weights: results are not meaningful**" if info["random_backbone"] else ""),
          f"- images: {info['n_images']} ({c.images.source}); SAEs: "
          + ("trained here" if info["sae_trained_here"] else "loaded from checkpoints")
          + f" ({c.sae.kind}, {c.sae.n_latents} latents, k={c.sae.k})",
          f"- brain: {c.brain.kind}, {numbers['n_voxels']} {unit} in {len(rois)} ROIs", ""]  # fmt: skip
    if info["sae_metrics"]:
        L += ["## SAEs", "", "| layer | FVE | L0 | dead fraction |", "|---|---|---|---|"]
        L += [f"| {k} | {_fmt(m['fve'])} | {_fmt(m['l0'])} | {_fmt(m['dead_fraction'])} |"
              for k, m in info["sae_metrics"].items()]  # fmt: skip
        L.append("")
    L += headline_lines(numbers)
    if "synthetic" in numbers:
        s = numbers["synthetic"]
        L += ["## Synthetic subject: recovery of the planted latents", "",
              f"- planted (layer, latent) recovered for **{s['recovered_fraction']:.1%}** of voxels "
              f"({_fmt(s['recovered_fraction_ncsnr_gt_0.5'])} for ncsnr > 0.5; "
              f"chance {s['chance_fraction']:.1e}); "
              f"planted layer recovered for {s['layer_recovered_fraction']:.1%}",
              f"- per-ROI median best layer follows the planted order: "
              f"**{'yes' if s['median_follows_planted_order'] else 'no'}**", "",
              "| ROI | planted layer | median best layer | recovered |", "|---|---|---|---|"]  # fmt: skip
        L += [f"| {r} | {s['planted_layer'][r]} | {_fmt(s['median_best_layer'][r])} | "
              f"{s['per_roi_recovered'][r]:.1%} |" for r in rois]  # fmt: skip
        L.append("")
    r = numbers["rsa"]
    L += ["## RSA (voxel x voxel structure)", "",
          f"{r['n_voxels']} voxels, {r['permutations']} permutations (Mantel test).", "",
          "| model | Spearman rho | p |", "|---|---|---|",
          f"| SAE voxel dictionary | {_fmt(r['sae_dictionary']['rho'])} | "
          f"{_fmt(r['sae_dictionary']['p_value'])} |",
          f"| raw-neuron baseline | {_fmt(r['neuron_baseline']['rho'])} | "
          f"{_fmt(r['neuron_baseline']['p_value'])} |", ""]  # fmt: skip
    L += _rsa_heatmap_lines(root)
    h = numbers["hierarchy"]
    head = "| ROI | " + " | ".join(f"L{lay}" for lay in layers) + " |"
    sep = "|---" * (len(layers) + 1) + "|"
    for rule in ("max", "mean"):
        L += [f"## Best layer per voxel ({rule} rule): voxels per ROI and layer", "", head + " median |",
              sep + "---|"]  # fmt: skip
        L += [f"| {q} | " + " | ".join(str(v) for v in h[rule]["roi_layer_counts"][q])
              + f" | {_fmt(h[rule]['median_best_layer'][q])} |" for q in rois]  # fmt: skip
        L.append("")
    L += ["## Distinct dictionary latents per ROI and layer", "", head, sep]
    L += [f"| {q} | " + " | ".join(str(v) for v in h["latents_per_roi"][q]) + " |" for q in rois]
    counts_png = LATENT_COUNTS if (root / "analysis" / LATENT_COUNTS).is_file() else None
    L += ["", *latent_mapping_lines(numbers, counts_png)]
    L += ["", "## ROI-consistent selectivity: each ROI's top latents by mean r over its voxels", "",
          "| ROI | layer:latent | mean r | top images |", "|---|---|---|---|"]  # fmt: skip
    L += [f"| {q} | {e['layer']}:{e['latent']} | {_fmt(e['mean_r'])} | "
          + ", ".join(str(i) for i in e["top_images"]) + " |"
          for q in rois for e in numbers.get("selectivity", {}).get(q, [])]  # fmt: skip
    L += _selectivity_figure_links(selectivity_figures, rois)
    L += selectivity_per_layer_lines(numbers)
    L += _encoding_lines(numbers["encoding"], rois)
    L += _map_lines(root, maps, maps_json.get("notes", []), c.brain.kind)
    if numbers.get("unavailable"):
        L += ["", "## Not available for this data", ""] + [f"- {note}" for note in numbers["unavailable"]]
    L += ["", "Numbers: `analysis/numbers.json`, `analysis/*.csv`, `dictionary/dictionary.csv`.", ""]
    (root / "report.md").write_text("\n".join(L))
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))
    return ["numbers.json", "../report.md"]


_RUNNERS = {
    "activations": _activations,
    "brain": _brain,
    "dictionary": _dictionary,
    "analysis": _analysis,
    "maps": _maps,
    "report": _report,
}
