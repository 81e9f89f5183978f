"""``sae-brainmap run``: the whole pipeline, end to end, in resumable stages.

1. ``activations``: stimuli through the ViT (residual streams of the chosen blocks); per layer an SAE
   (loaded, or a small one trained here); per layer the mean over patch tokens of the SAE codes
   ``[N, U]`` and of the raw residual ``[N, 768]``, and the last block's CLS token (the encoding baseline).
2. ``brain``: the synthetic subject on pycortex's S1, planted from those SAE codes, or NSD betas.
3. ``dictionary``: the voxel dictionary over SAE latents and a raw-neuron one over residual dimensions.
4. ``analysis``: RSA, the layer hierarchy, the ridge encoding baseline, the synthetic recovery.
5. ``maps``: flatmaps of best layer, max r and two images' dictionary activations.
6. ``report``: ``report.md`` with the numbers and the figures.

Each stage writes into ``<out>/<stage>/`` and ends with ``manifest.json``: a hash of its inputs (its config
section, the stamps of input files, the hashes of the stages it reads) and its output files. A stage whose
manifest hash matches and whose outputs all exist is skipped. Arrays are ``.npz`` (no pickle).
"""

import csv
import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .run_config import RunConfig

VERSION = 1  # bump when a stage's outputs change meaning
STAGES = ("activations", "brain", "dictionary", "analysis", "maps", "report")
UPSTREAM = {
    "activations": (),
    "brain": ("activations",),
    "dictionary": ("activations", "brain"),
    "analysis": ("activations", "brain", "dictionary"),
    "maps": ("brain", "dictionary", "analysis"),
    "report": ("activations", "brain", "analysis", "maps"),
}


def _stamp(path: str | None) -> list | None:
    """A file's identity for the hash: path, size, mtime (None for no file)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        return [str(p), sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir())]
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
                     "subject": c.brain.nsd.subject}  # fmt: skip
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
        n = c.brain.nsd
        files = [*n.betas, n.expdesign, n.ncsnr, *n.roi_files.values(), *(n.label_tables or {}).values()]
        return {"kind": "nsd", "nsd": dataclasses.asdict(n), "files": [_stamp(f) for f in files]}
    if stage in ("dictionary", "analysis", "maps"):
        return dataclasses.asdict(getattr(c, stage))
    return {}


class Stage:
    def __init__(self, root: Path, name: str, inputs: dict) -> None:
        self.name, self.dir = name, root / name
        self.hash = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]

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


def run_pipeline(config: RunConfig, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run every stage (skipping those already done); returns ``{stage: "ran" | "skipped"}``. ``log``
    gets the progress lines (default: printed)."""
    log = log or functools.partial(print, flush=True)
    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
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
        if stage.done():
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
    """The (sorted, unique) NSD ids of the images in the subject's betas files: the rows of everything."""
    import nibabel as nib

    from .brain import load_expdesign

    n_trials = sum(int(nib.load(str(Path(b).expanduser())).shape[-1]) for b in c.brain.nsd.betas)
    design = load_expdesign(Path(c.brain.nsd.expdesign).expanduser())
    return np.unique(design.trial_images(c.brain.nsd.subject, n_trials))


def _image_source(c: RunConfig):
    from .images import EmbeddedImages, FolderImages, NSDImages

    if c.images.source == "embedded":
        return EmbeddedImages(c.images.n_images, c.images.seed)
    if c.images.path is None:
        raise ValueError(f"images.source {c.images.source} needs images.path")
    if c.images.source == "folder":
        return FolderImages(Path(c.images.path).expanduser())
    return NSDImages(Path(c.images.path).expanduser(), indices=_nsd_image_ids(c).tolist())


def _sae_paths(c: RunConfig, layers: list[int]) -> dict[int, Path] | None:
    ck = c.sae.checkpoints
    if ck is None:
        return None
    if isinstance(ck, str):
        return {lay: Path(ck).expanduser() / f"layer_{lay:02d}.safetensors" for lay in layers}
    missing = [lay for lay in layers if lay not in ck]
    if missing:
        raise ValueError(f"sae.checkpoints has no SAE for layer(s) {missing}")
    return {lay: Path(ck[lay]).expanduser() for lay in layers}


# ----------------------------------------------------------------------------------------------------
# stages


def _activations(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .backbone import ViTBackbone
    from .checkpoint import load_sae, save_sae
    from .images import to_model_input
    from .module import train_sae

    kwargs = {"img_size": c.backbone.img_size} if c.backbone.img_size else {}
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            bb = ViTBackbone(c.backbone.name, checkpoint=c.backbone.checkpoint, model_kwargs=kwargs)
    for w in caught:
        log(f"  warning: {w.message}")
    layers = list(range(bb.depth)) if c.backbone.layers is None else sorted(set(c.backbone.layers))
    last = bb.depth - 1
    source = _image_source(c)
    n = len(source)
    paths = _sae_paths(c, layers)
    saes = {lay: load_sae(p) for lay, p in paths.items()} if paths else None
    log(f"  {n} images at {bb.img_size[0]} px through {bb.name}, layers {layers}")
    resid_mean = {lay: [] for lay in layers}
    codes: dict[int, list] = {lay: [] for lay in layers}
    tokens: dict[int, list] = {lay: [] for lay in layers}
    cls = []
    t0 = time.perf_counter()
    for start in range(0, n, c.images.batch_size):
        idx = range(start, min(n, start + c.images.batch_size))
        x = torch.stack([to_model_input(source[i], bb.img_size, bb.mean, bb.std) for i in idx])
        streams = bb(x, sorted(set(layers) | {last}))
        cls.append(streams[last][:, 0].float())
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
    metrics = {}
    if saes is None:
        saes = {}
        (out / "saes").mkdir(exist_ok=True)
        for lay in layers:
            t = torch.cat(tokens[lay])  # [N, T, d]
            flat = t.reshape(-1, t.shape[-1])
            sae = train_sae(flat, kind=c.sae.kind, n_latents=c.sae.n_latents, k=c.sae.k, lr=c.sae.lr,
                            batch_size=c.sae.batch_size, epochs=-1, max_steps=c.sae.steps,
                            seed=c.sae.seed + lay, layer=lay, backbone=bb.name, tokens="patch")  # fmt: skip
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
            "random_backbone": c.backbone.checkpoint is None, "sae_trained_here": paths is None,
            "sae_metrics": {str(k): v for k, v in metrics.items()}}  # fmt: skip
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return [
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    ]


def _brain(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .brain import load_nsd_betas, noise_ceiling, roi_masks
    from .brain.nsd import load_volume

    if c.brain.kind == "synthetic":
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
    else:
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
        if not np.array_equal(data.images, expected):
            raise RuntimeError("NSD responses and stimuli do not list the same images")
        ncsnr = (load_volume(Path(n_cfg.ncsnr).expanduser(), "ncsnr")[0][mask] if n_cfg.ncsnr
                 else np.full(int(mask.sum()), np.nan))  # fmt: skip
        np.savez(out / "responses.npz", responses=data.responses,
                 roi=np.asarray([roi_vol[tuple(v)] for v in data.voxels], dtype=str), voxels=data.voxels,
                 voxels_full=data.voxels, volume_shape=np.asarray(mask.shape), ncsnr=ncsnr,
                 n_repeats=data.n_repeats, nsd_images=data.images,
                 roi_names=np.asarray(n_cfg.rois))  # fmt: skip
    with np.load(out / "responses.npz", allow_pickle=False) as f:
        nc = noise_ceiling(f["ncsnr"], float(np.mean(f["n_repeats"])))
        log(f"  responses {f['responses'].shape}, median noise ceiling {np.nanmedian(nc):.1f}%")
    return [
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    ]


def _dictionary(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .dictionary import build_voxel_dictionary

    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        responses, roi = torch.from_numpy(f["responses"]).float(), f["roi"]
    d = c.dictionary
    kw = {"centered": d.centered, "one_to_one": d.one_to_one, "candidates": d.candidates}
    sae = build_voxel_dictionary(_load_layers(root / "activations" / "sae_codes.npz"), responses, **kw)
    sae.save(out / "sae_dictionary.npz")
    raw = build_voxel_dictionary(_load_layers(root / "activations" / "residual_means.npz"), responses, **kw)
    raw.save(out / "neuron_dictionary.npz")
    log(f"  {sae.n_voxels} voxels: median r SAE latents {sae.r.median():.3f}, "
        f"residual dims {raw.r.median():.3f}")  # fmt: skip
    rows = [[v, roi[v], int(sae.layer[v]), int(sae.latent[v]), f"{float(sae.r[v]):.4f}", int(raw.layer[v]),
             int(raw.latent[v]), f"{float(raw.r[v]):.4f}"] for v in range(sae.n_voxels)]  # fmt: skip
    header = ["voxel", "roi", "layer", "latent", "r", "neuron_layer", "neuron", "neuron_r"]
    _write_csv(out / "dictionary.csv", header, rows)
    return ["sae_dictionary.npz", "neuron_dictionary.npz", "dictionary.csv"]


def _median_order_ok(medians: dict[str, float], planted: dict[str, int]) -> bool:
    """Whether, for every pair of ROIs planted at layers a < b, median best layer(a) <= median(b)."""
    names = list(medians)
    return all(
        medians[x] <= medians[y] for x in names for y in names if planted[x] < planted[y]
    )  # fmt: skip


def _analysis(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .analysis import (
        best_layer,
        latents_per_roi,
        layer_r,
        ridge_encoding,
        roi_layer_counts,
        roi_selectivity,
        rsa,
    )
    from .brain import noise_ceiling
    from .dictionary import VoxelDictionary

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
    numbers: dict = {"n_images": int(responses.shape[0]), "n_voxels": int(responses.shape[1]),
                     "layers": layers, "rois": rois}  # fmt: skip

    # RSA on voxels that have a match in both dictionaries and are not constant
    ok = (sae.latent.numpy() >= 0) & (raw.latent.numpy() >= 0) & (responses.std(0) > 0)
    ok &= (sae.activations.numpy().std(0) > 0) & (raw.activations.numpy().std(0) > 0)
    idx = np.flatnonzero(ok)
    rng = np.random.default_rng(a.seed)
    if len(idx) > a.rsa_max_voxels:
        idx = np.sort(rng.choice(idx, a.rsa_max_voxels, replace=False))
    numbers["rsa"] = {"n_voxels": len(idx), "permutations": a.rsa_permutations}
    for name, d in (("sae_dictionary", sae), ("neuron_baseline", raw)):
        res = rsa(responses[:, idx], d.activations.numpy()[:, idx], a.rsa_permutations, a.seed)
        numbers["rsa"][name] = {"rho": res.rho, "p_value": res.p_value}
        log(f"  RSA {name}: rho {res.rho:.3f}, p {res.p_value:.4f}")

    # hierarchy
    resp_t = torch.from_numpy(responses)
    hier: dict = {}
    per_voxel = {}
    for rule in ("max", "mean"):
        scores = layer_r(codes, resp_t, rule=rule)
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
    np.savez(out / "per_voxel.npz", max_r=sae.r.numpy(), **per_voxel)

    # ROI-consistent selectivity: each ROI's top latents by mean r over its voxels, with their top images
    sel = roi_selectivity(codes, resp_t, roi, rois, top_latents=3, top_images=5)
    numbers["selectivity"] = {
        r: [{"layer": e.layer, "latent": e.latent, "mean_r": e.mean_r, "top_images": e.top_images}
            for e in entries]
        for r, entries in sel.items()
    }  # fmt: skip

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
        "per_roi_median_r2": {r: float(np.nanmedian(enc.r2[roi == r])) for r in rois},
    }  # fmt: skip
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


def _maps(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from .dictionary import VoxelDictionary
    from .maps import flatmap_png

    for old in out.glob("*.png"):
        old.unlink()
    if not c.maps.enabled or c.maps.subject is None:
        log("  maps disabled (maps.enabled false or no maps.subject)")
        (out / "maps.json").write_text(json.dumps({"maps": []}))
        return ["maps.json"]
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        vox, shape = f["voxels_full"], tuple(int(s) for s in f["volume_shape"])
    with np.load(root / "analysis" / "per_voxel.npz", allow_pickle=False) as f:
        best, max_r = f["best_layer_max"], f["max_r"]
    sae = VoxelDictionary.load(root / "dictionary" / "sae_dictionary.npz")
    layers = list(sae.layers)
    kw = {"subject": c.maps.subject, "xfm": c.maps.xfm}
    made = []
    made.append(flatmap_png(best, vox, shape, out / "best_layer.png", "best layer (max rule)", cmap="viridis",
                            vmin=min(layers), vmax=max(layers), label="layer", **kw))  # fmt: skip
    made.append(flatmap_png(max_r, vox, shape, out / "max_r.png", "max r (voxel dictionary)", cmap="magma",
                            label="Pearson r", **kw))  # fmt: skip
    acts = sae.activations.numpy()
    for i in c.maps.images:
        if i >= acts.shape[0]:
            log(f"  maps.images: image {i} out of range ({acts.shape[0]} images), skipped")
            continue
        a = acts[i]
        mu, sd = acts.mean(0), acts.std(0)
        z = np.where(sd > 0, (a - mu) / np.where(sd > 0, sd, 1), 0.0)
        made.append(flatmap_png(z, vox, shape, out / f"activation_image_{i:04d}.png",
                                f"dictionary activation, image {i}", cmap="RdBu_r", vmin=-3, vmax=3,
                                label="z over images", **kw))  # fmt: skip
        log(f"  map {made[-1].name}")
    (out / "maps.json").write_text(json.dumps({"maps": [p.name for p in made]}))
    return ["maps.json", *[p.name for p in made]]


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _report(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    numbers = json.loads((root / "analysis" / "numbers.json").read_text())
    info = json.loads((root / "activations" / "info.json").read_text())
    maps = json.loads((root / "maps" / "maps.json").read_text())["maps"]
    layers, rois = numbers["layers"], numbers["rois"]
    L: list[str] = ["# SAE-BrainMap run report", ""]
    L += [f"- backbone: `{info['backbone']}` at {info['img_size'][0]} px, layers {layers}"
          + (" — **random weights: results are not meaningful**" if info["random_backbone"] else ""),
          f"- images: {info['n_images']} ({c.images.source}); SAEs: "
          + ("trained here" if info["sae_trained_here"] else "loaded from checkpoints")
          + f" ({c.sae.kind}, {c.sae.n_latents} latents, k={c.sae.k})",
          f"- brain: {c.brain.kind}, {numbers['n_voxels']} voxels in {len(rois)} ROIs", ""]  # fmt: skip
    if info["sae_metrics"]:
        L += ["## SAEs", "", "| layer | FVE | L0 | dead fraction |", "|---|---|---|---|"]
        L += [f"| {k} | {_fmt(m['fve'])} | {_fmt(m['l0'])} | {_fmt(m['dead_fraction'])} |"
              for k, m in info["sae_metrics"].items()]  # fmt: skip
        L.append("")
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
    L += ["", "## ROI-consistent selectivity: each ROI's top latents by mean r over its voxels", "",
          "| ROI | layer:latent | mean r | top images |", "|---|---|---|---|"]  # fmt: skip
    L += [f"| {q} | {e['layer']}:{e['latent']} | {_fmt(e['mean_r'])} | "
          + ", ".join(str(i) for i in e["top_images"]) + " |"
          for q in rois for e in numbers.get("selectivity", {}).get(q, [])]  # fmt: skip
    e = numbers["encoding"]
    L += ["", "## Encoding baseline (ridge from the last layer's CLS)", "",
          f"{e['n_train']} training / {e['n_test']} held-out images: median R^2 {_fmt(e['median_r2'])}, "
          f"mean {_fmt(e['mean_r2'])}; median R^2 / noise ceiling {_fmt(e['median_r2_over_ceiling'])} "
          f"(median ceiling {_fmt(e['median_noise_ceiling_pct'])}%).", "",
          "| ROI | median R^2 |", "|---|---|"]  # fmt: skip
    L += [f"| {q} | {_fmt(e['per_roi_median_r2'][q])} |" for q in rois]
    if maps:
        L += ["", "## Maps", ""]
        for m in maps:
            L.append(f"![{m}](maps/{m})")
            stim = root / "activations" / f"stimulus_{m.split('_')[-1].split('.')[0]}.png"
            if m.startswith("activation_image") and stim.is_file():
                L.append(f"![stimulus](activations/{stim.name})")
            L.append("")
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
