"""Stage 1, ``activations``: stimuli through the backbone, per layer an SAE (loaded or trained here),
per image the mean SAE codes and residual, the last block's CLS token."""

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..run_config import (
    RunConfig,
    RunConfigError,
)
from .common import _backbone, _image_source, _sae_paths, _save_layers

# the version of this stage's code: bump it when its outputs change meaning, so that a rerun after
# an upgrade recomputes this stage and those after it (the runner puts it into the stage's hash)
VERSION = 1


def _activations(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from ..checkpoint import load_sae, save_sae
    from ..module import train_sae

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
