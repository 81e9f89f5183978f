"""SAE training throughput (tokens/s) and activation extraction (images/s): sae_brainmap vs overcomplete.

    python benchmarks/sae_train.py [--device cpu|cuda] [--quick] [--tokens N] [--train_steps N]

All in one run, on the same activations: the patch tokens of layer 6 of a random-init CLIP ViT-B/16
(sae_brainmap's backbone) over the embedded images, d=768, 12,288 latents (x16).
- ``extract``: backbone forward for all 12 layers, patch tokens stored in an fp16 activation store
  (``img_per_s``).
- One training step (encode, loss, backward, AdamW step, decoder renormalisation) of a ``batch``-token
  batch for: ``sae_brainmap topk`` (k=64, AuxK, unit-norm decoder), ``sae_brainmap relu_l1`` (the paper's:
  tied, L1), and ``overcomplete TopKSAE`` (k=64; its default Linear+BatchNorm encoder and its
  ``top_k_auxiliary_loss``), timed in interleaved rounds (``tokens_per_s``, ``x_overcomplete``).
- Reconstruction at equal L0: each TopK SAE trained for ``train_steps`` steps (same batches, same lr),
  then ``fve`` (fraction of variance explained) and ``l0`` on held-out tokens.
"""

import argparse
import time

import torch
from _common import add_common_args, apply_threads, save, time_many

LEGEND = (
    "d=768, 12,288 latents, activations of a random-init CLIP ViT-B/16 (layer 6 patch tokens, embedded "
    "images). step = forward + loss + backward + AdamW step on `batch` tokens; tokens_per_s = batch / median "
    "step time; x_overcomplete = tokens/s over overcomplete's TopKSAE; fve / l0 on held-out tokens after "
    "`train_steps` steps of each TopK SAE on the same batches; extract: img/s of the backbone into the "
    "fp16 store (all 12 layers)."
)


def _overcomplete():
    # overcomplete 0.3 calls matplotlib.cm.get_cmap at import, removed in matplotlib 3.9+.
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE
    from overcomplete.sae.losses import top_k_auxiliary_loss

    return TopKSAE, top_k_auxiliary_loss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--images", type=int, default=48, help="images to extract (x196 tokens)")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per training step")
    ap.add_argument("--train_steps", type=int, default=20, help="steps for the reconstruction comparison")
    args = ap.parse_args(argv)
    apply_threads(args)
    dev = args.device
    import importlib.metadata
    import tempfile
    import warnings

    from sae_brainmap import SAEModule, ViTBackbone, make_sae
    from sae_brainmap.images import EmbeddedImages, ImageDataset
    from sae_brainmap.metrics import batch_metrics
    from sae_brainmap.store import extract_activations

    d, m, k = 768, 12288, 64
    n_images = 8 if args.quick else args.images
    batch = 256 if args.quick else args.batch
    steps = 2 if args.quick else args.train_steps
    torch.manual_seed(0)

    # ---------------------------------------------------------------------------------------- extraction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = ViTBackbone()
    data = ImageDataset(EmbeddedImages(n_images), bb.img_size, bb.mean, bb.std)
    with tempfile.TemporaryDirectory() as tmp:
        bb(torch.stack([data[0]]).to(dev))  # warm-up
        start = time.perf_counter()
        store = extract_activations(bb, data, tmp, batch_size=16, device=dev, progress=False)
        extract_s = time.perf_counter() - start
        acts = store.layer(6).float()
    acts = acts[torch.randperm(len(acts))].to(dev)
    n_held = min(2048, len(acts) // 4)
    held_out, train = acts[:n_held], acts[n_held:]
    x = train[:batch]

    # ---------------------------------------------------------------------------------------- contenders
    TopKSAE, aux_loss = _overcomplete()

    def ours(kind: str):
        sae = make_sae(kind, d, m, init_seed=0, k=k).to(dev)
        sae.init_from_data(train[:4096])
        module = SAEModule({"x": sae})
        opt = torch.optim.AdamW(sae.parameters(), lr=2e-4)

        def step(xb=x):
            loss = sae.loss(xb)["loss"]
            loss.backward()
            module.on_before_optimizer_step(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.normalize_decoder()

        return sae, step

    def theirs():
        sae = TopKSAE(d, nb_concepts=m, top_k=k, device=dev)
        opt = torch.optim.AdamW(sae.parameters(), lr=2e-4)

        def step(xb=x):
            pre, z, x_hat = sae(xb)
            loss = aux_loss(xb, x_hat, pre, z, sae.get_dictionary())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return sae, step

    contenders = {
        "sae_brainmap topk": ours("topk"),
        "sae_brainmap relu_l1": ours("relu_l1"),
        "overcomplete TopKSAE": theirs(),
    }
    times = time_many({n: s for n, (_, s) in contenders.items()}, dev, rounds=1 if args.quick else 3)

    # ---------------------------------------------------- reconstruction at equal L0 (fresh, same batches)
    quality = {}
    for name, make in (("sae_brainmap topk", lambda: ours("topk")), ("overcomplete TopKSAE", theirs)):
        torch.manual_seed(1)
        sae, step = make()
        for i in range(steps):
            lo = (i * batch) % max(1, len(train) - batch)
            step(train[lo : lo + batch])
        with torch.no_grad():
            if name.startswith("overcomplete"):
                sae.eval()
                _, z, x_hat = sae(held_out)
            else:
                x_hat, z = sae.eval()(held_out)
        quality[name] = batch_metrics(held_out, x_hat, z)

    base = times["overcomplete TopKSAE"]
    rows = [
        {
            "step": "extract (12 layers, fp16 store)",
            "batch": n_images,
            "step_ms": extract_s * 1e3,
            "img_per_s": n_images / extract_s,
        }
    ]
    for name, ms in times.items():
        q = quality.get(name, {})
        rows.append(
            {
                "step": name,
                "batch": batch,
                "step_ms": ms,
                "tokens_per_s": batch / (ms * 1e-3) if ms else None,
                "x_overcomplete": base / ms if ms and base else None,
                "train_steps": steps if q else None,
                "l0": q.get("l0"),
                "fve": q.get("fve"),
            }
        )
    try:
        oc_version = importlib.metadata.version("overcomplete")
    except importlib.metadata.PackageNotFoundError:
        oc_version = None
    save("sae-train", dev, rows, write=not args.quick, legend=LEGEND, note=f"overcomplete {oc_version}")


if __name__ == "__main__":
    main()
