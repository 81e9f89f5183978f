"""Spiking transformers as backbones (kind ``spiking``): each block's output averaged over the T steps equals
a step-by-step run by hand; a spiking checkpoint named by class path goes through ``sae-brainmap run`` end
to end on the synthetic subject; a class path that does not import or a bad checkpoint is one line. Also the
timm kind's preprocessing against timm's own transform, and stores refusing a backbone of another kind."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import spikecore
from sae_brainmap.backbone import Backbone, ViTBackbone
from sae_brainmap.cli import main
from sae_brainmap.images import EmbeddedImages, ImageDataset, to_model_input
from sae_brainmap.pipeline import STAGES
from sae_brainmap.run_config import RunConfigError, load_run_config
from sae_brainmap.spiking import SpikeRateBackbone
from sae_brainmap.store import StoreError, extract_activations
from spikecore.models import create_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIZE = 16  # px: Spikformer / SDT 4 x 4 tokens; QKFormer 16 x 16, 8 x 8, 4 x 4
TINY = {
    "spikformer_4_384": dict(embed_dim=32, depth=2, num_heads=2),
    "qkformer_hst_4_384": dict(embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=2),
    "sdt_2_512": dict(embed_dim=32, depth=2, num_heads=2),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    source = EmbeddedImages(n, seed)
    return torch.stack([to_model_input(source[i], (SIZE, SIZE), MEAN, STD) for i in range(n)])


def _lively(net: nn.Module, x: torch.Tensor, scale: float = 3.0) -> nn.Module:
    """A random spiking network is silent: set every BatchNorm's statistics to those of ``x`` (one forward in
    training mode) and its weight to ``scale``, so that a good part of the neurons fire; eval mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = 1.0
    net.train()
    with torch.no_grad():
        spikecore.reset(net)
        net(x)
        spikecore.reset(net)
        for bn in bns:
            bn.weight.fill_(scale)
            bn.momentum = 0.1
    return net.eval()


def _tiny(arch: str, T: int = 4, stateful: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = create_model(arch, img_size=SIZE, T=T, backend="torch", stateful=stateful, **TINY[arch])
    return _lively(net, _images(16, seed=7))


def _rates_by_hand(net: nn.Module, arch: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's ``[B, N, D]`` rate from a copy of ``net`` with stateful neurons run one time step at a
    time through a plain loop: the stem, the blocks on the spatial layout, the stage transitions; each
    block's output of each step kept, then averaged over the T steps."""
    step = create_model(arch, img_size=SIZE, T=net.T, backend="torch", stateful=True, **TINY[arch])
    step.load_state_dict(net.state_dict())
    step.eval()
    outputs = [[] for _ in step.blocks]
    spikecore.reset(step)
    with torch.no_grad():
        for _ in range(net.T):
            h = step.forward_stem(x[None])  # one step: [1, B, D, H, W]
            stage = 0
            for i, block in enumerate(step.blocks):
                while stage < step.block_stage[i]:
                    h = step.downsample[stage](h)
                    stage += 1
                h = block(h)  # spatial in, spatial out
                outputs[i].append(h[0].flatten(2))  # [B, D, N]
    spikecore.reset(step)
    return [torch.stack(o).mean(0).transpose(1, 2) for o in outputs]


@pytest.mark.parametrize("arch", list(TINY))
def test_per_block_spike_rates_equal_a_step_by_step_run_by_hand(arch):
    net = _tiny(arch)
    bb = SpikeRateBackbone(net, arch)
    assert isinstance(bb, Backbone) and bb.kind == "spiking" and bb.depth == len(net.blocks)
    x = _images(5)
    rates = bb(x)
    expected = _rates_by_hand(net, arch, x)
    assert sorted(rates) == list(range(bb.depth))
    for i, rate in rates.items():
        rows, cols = bb.patch_grid(i)
        assert rate.shape == (5, rows * cols, bb.layer_dim(i))  # [B, tokens, D]: tokens in raster order
        # float32 sums in another order (T steps batched vs one at a time): SDT's real-valued residuals
        torch.testing.assert_close(rate, expected[i], rtol=1e-4, atol=1e-5)
        assert float((rate != 0).float().mean()) > 0.05 and float(rate.std()) > 0.05  # not silent or flat
        if arch != "sdt_2_512":  # Spikformer / QKFormer blocks output sums of spikes: rates in steps of 1/T
            counts = rate * net.T
            torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-5)
    assert torch.equal(bb.select_tokens(rates[0], "patch"), rates[0])  # no CLS token: all are patches
    torch.testing.assert_close(bb.embedding(rates[bb.depth - 1]), rates[bb.depth - 1].mean(1))
    with pytest.raises(ValueError, match="no CLS token"):
        bb.select_tokens(rates[0], "cls")
    only = bb(x, layers=[bb.depth - 1])
    assert list(only) == [bb.depth - 1]
    torch.testing.assert_close(only[bb.depth - 1], rates[bb.depth - 1])
    with pytest.raises(ValueError, match="out of range"):
        bb(x, layers=[bb.depth])
    if arch == "qkformer_hst_4_384":  # three stages: three widths and three token grids
        assert [bb.patch_grid(i) for i in range(3)] == [(16, 16), (8, 8), (4, 4)]
        assert [bb.layer_dim(i) for i in range(3)] == [8, 16, 32]


class Segmented(nn.Module):
    """TDFormer's schedule without its feedback: the T steps cut into segments run one after the other
    through the backbone, its neuron state carried across them."""

    def __init__(self, backbone: nn.Module, segments: int) -> None:
        super().__init__()
        self.backbone, self.segments = backbone, segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikecore.reset(self)
        for chunk in self.backbone.to_sequence(x).chunk(self.segments):
            h = self.backbone.forward_features(chunk)
        return self.backbone.forward_head(h)


class TwoPass(nn.Module):
    """SpiLiFormer's schedule: the whole network, then, from rest, its blocks again over the same T steps
    with a feedback input (here the first pass's output, into each block's attention input)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        spikecore.reset(self)
        stem = bb.forward_stem(bb.to_sequence(x))
        z1 = bb.forward_blocks(stem)
        spikecore.reset(self)
        z2 = bb.forward_blocks(stem, {i: {"x_extra": z1} for i in range(len(bb.blocks))})
        return bb.forward_head(z2)


def test_segments_are_joined_and_a_second_pass_replaces_the_first():
    arch = "spikformer_4_384"
    x = _images(4)
    plain = _tiny(arch)
    expected = SpikeRateBackbone(plain, arch)(x)
    stateful = _tiny(arch, stateful=True)
    stateful.load_state_dict(plain.state_dict())
    segmented = SpikeRateBackbone(Segmented(stateful, segments=2), "segmented")(x)
    for i in expected:  # two segments of T/2 steps with the state carried are the T steps at once
        torch.testing.assert_close(segmented[i], expected[i], rtol=1e-5, atol=1e-6)

    two = SpikeRateBackbone(TwoPass(plain), "two-pass")(x)
    with torch.no_grad():  # the second pass by hand: the blocks in a loop over all T steps
        spikecore.reset(plain)
        stem = plain.forward_stem(plain.to_sequence(x)).flatten(3)
        z1 = plain.forward_blocks(stem)
        spikecore.reset(plain)
        h, second = stem, []
        for block in plain.blocks:
            h = block(h, x_extra=z1)
            second.append(h.mean(0).transpose(1, 2))
    for i, rate in two.items():
        torch.testing.assert_close(rate, second[i], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(rate, expected[i])  # the feedback changed them: the first pass is not it


def _spiking_checkpoint(path: Path) -> Path:
    """A Lightning checkpoint written by a Trainer (0 steps) of spikecore's SpikingClassifier on a tiny
    Spikformer (two blocks of 32 channels, 4 x 4 tokens at 16 px, T=4) whose BatchNorms fire."""
    import pytorch_lightning as pl

    from spikecore.train import SpikingClassifier

    torch.manual_seed(0)
    kwargs = dict(img_size=SIZE, backend="torch", **TINY["spikformer_4_384"])
    module = SpikingClassifier(arch="spikformer_4_384", num_classes=10, T=4, arch_kwargs=kwargs)
    x = _images(16, seed=7)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long)))
    trainer = pl.Trainer(
        max_epochs=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=path.parent,
    )
    trainer.fit(module, data)
    _lively(module.net, x)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _spiking_checkpoint(tmp_path_factory.mktemp("spiking") / "tiny.ckpt")


def _config(folder: Path, checkpoint: Path | None, **backbone) -> Path:
    """The packaged demo_spiking.yaml with this checkpoint, a class that ships with spikecore, tiny sizes."""
    cfg = yaml.safe_load((CONFIGS / "demo_spiking.yaml").read_text())
    cfg["out"] = str(folder / "out")
    cfg["images"].update(n_images=40, batch_size=20)
    cfg["backbone"].update(class_path="spikecore.train.SpikingClassifier", mean=None, std=None,
                           checkpoint=None if checkpoint is None else str(checkpoint))  # fmt: skip
    cfg["backbone"].update(backbone)
    cfg["sae"].update(n_latents=64, k=4, steps=40, batch_size=160)
    cfg["brain"]["synthetic"]["rois"] = ["V1", "V2", "FFA", "PPA"]
    cfg["analysis"].update(rsa_permutations=99, rsa_max_voxels=300, selectivity_latents=2,
                           selectivity_images=3)  # fmt: skip
    cfg["maps"].update(enabled=False, images=[0, 3])  # the flatmaps have their own tests
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spiking.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_end_to_end_on_a_spiking_checkpoint(checkpoint, tmp_path):
    path = _config(tmp_path, checkpoint)
    main(["run", "--config", str(path)])
    out = tmp_path / "out"
    assert all((out / name / "manifest.json").is_file() for name in STAGES)
    info = json.loads((out / "activations" / "info.json").read_text())
    assert info["backbone"] == "SpikingClassifier(spikformer_4_384)" and info["backbone_kind"] == "spiking"
    assert info["layers"] == [0, 1] and info["img_size"] == [SIZE, SIZE] and not info["random_backbone"]
    report = (out / "report.md").read_text()
    assert "SpikingClassifier(spikformer_4_384)" in report
    numbers = json.loads((out / "analysis" / "numbers.json").read_text())
    syn = numbers["synthetic"]
    assert syn["recovered_fraction"] > 50 * syn["chance_fraction"]  # the planted latents come back

    # The stored per-image means are the spike rates a hand-run of the checkpoint's network gives.
    from spikecore.train import SpikingClassifier

    ck = torch.load(checkpoint, weights_only=True)
    module = SpikingClassifier(**ck["hyper_parameters"])
    module.load_state_dict(ck["state_dict"])
    source = EmbeddedImages(40, 0)
    picked = [0, 7, 39]
    x = torch.stack([to_model_input(source[i], (SIZE, SIZE), MEAN, STD) for i in picked])  # ImageNet's
    by_hand = _rates_by_hand(module.net.eval(), "spikformer_4_384", x)
    with np.load(out / "activations" / "residual_means.npz") as f:
        for lay in (0, 1):
            stored = f[f"layer_{lay:02d}"][picked]
            np.testing.assert_allclose(stored, by_hand[lay].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    with np.load(out / "activations" / "final_embedding.npz") as f:  # the encoding baseline: token mean
        np.testing.assert_allclose(f["cls"][picked], by_hand[1].mean(1).numpy(), rtol=1e-5, atol=1e-6)

    # The selectivity figures' patch maps (4 x 4 token grid) reproduce the stored per-image codes.
    with np.load(out / "activations" / "sae_codes.npz") as f:
        codes = {k: f[k] for k in f.files}
    with np.load(out / "maps" / "selectivity_maps.npz") as f:
        drawn = {k: f[k] for k in f.files}
    for roi, entries in numbers["selectivity"].items():
        assert drawn[f"maps_{roi}"].shape == (2, 3, 4, 4)
        for maps, e in zip(drawn[f"maps_{roi}"], entries, strict=True):
            stored = codes[f"layer_{e['layer']:02d}"][e["top_images"], e["latent"]]
            np.testing.assert_allclose(maps.mean((1, 2)), stored, rtol=1e-4, atol=1e-6)


def _one_line(capsys, path: Path) -> str:
    """``sae-brainmap run`` on ``path`` exits with status 2 and one ``error:`` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_a_class_path_that_does_not_import_or_a_bad_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    at_load = {  # found when the config is read, before any work
        "no_module": ({"class_path": "no_such_package.Model"}, checkpoint,
                      r"backbone\.class_path 'no_such_package\.Model' does not import \(ModuleNotFoundError"),
        "no_class": ({"class_path": "spikecore.train.NoSuchModel"}, checkpoint,
                     r"spikecore\.train.*has no 'NoSuchModel'"),
        "not_a_model": ({"class_path": "spikecore.errors.UserError"}, checkpoint, "is not a torch.nn.Module"),
        "missing": ({}, tmp_path / "missing.ckpt", r"backbone\.checkpoint .*missing\.ckpt does not exist"),
        "unknown_name": ({"class_path": None, "name": "spikformer_9_999"}, None,
                         "'spikformer_9_999' is not a spikecore model"),
        "timm_with_class": ({"kind": "timm"}, None, "backbone.class_path names a spiking model class"),
    }  # fmt: skip
    for case, (backbone, ckpt, message) in at_load.items():
        path = _config(tmp_path / case, ckpt, **backbone)
        with pytest.raises(RunConfigError, match=message):
            load_run_config(path)
        assert "error: " in _one_line(capsys, path), case
        assert not (tmp_path / case / "out").exists()

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    other = create_model("spikformer_4_384", img_size=SIZE, embed_dim=16, depth=1, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "model": nn.Linear(2, 2)}, pickled)  # a pickled object: never unpickled
    at_build = {  # found when the backbone is built, before any image
        "garbage": ({}, garbage, "cannot read spiking backbone checkpoint"),
        "pickled": ({}, pickled, "refused for safety"),
        "other_net": ({"init_args": {"arch_kwargs": dict(img_size=SIZE, **TINY["spikformer_4_384"])}},
                      tmp_path / "other.pt", "does not fit the spiking backbone"),
        "bad_layer": ({"layers": [0, 2]}, checkpoint, r"backbone\.layers \[2\] out of range: .* 2 blocks"),
        "silent": ({"class_path": None, "name": "spikformer_4_384",  # random weights: nothing fires
                    "init_args": dict(img_size=SIZE, backend="torch", **TINY["spikformer_4_384"])}, None,
                   r"layer\(s\) \[0, 1\] are zero on every image"),
    }  # fmt: skip
    for case, (backbone, ckpt, message) in at_build.items():
        line = _one_line(capsys, _config(tmp_path / case, ckpt, **backbone))
        assert len(line) < 600 and re.search(message, line), (case, line)
        assert not (tmp_path / case / "out" / "activations" / "manifest.json").exists()


def test_a_store_records_the_backbone_kind_and_refuses_another(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        torch.manual_seed(0)
        vit = ViTBackbone(model_kwargs=dict(embed_dim=32, depth=2, num_heads=2, img_size=SIZE, patch_size=4))
    spiking = SpikeRateBackbone(_tiny("spikformer_4_384"), "spikformer_4_384")
    kw = {"layers": [0, 1], "images_per_shard": 4, "batch_size": 4, "progress": False}
    data = ImageDataset(EmbeddedImages(4), **spiking.preprocessing)
    store = extract_activations(spiking, data, tmp_path / "store", **kw)
    recorded = store.manifest["provenance"]["backbone"]
    assert recorded["kind"] == "spiking" and recorded["class"] == "spikecore.models.spikformer.Spikformer"
    assert store.manifest["d"] == 32 and store.manifest["tokens_per_image"] == 16
    with pytest.raises(StoreError, match=r'backbone\.kind \(store "spiking", now "timm"\)'):
        extract_activations(
            vit, ImageDataset(EmbeddedImages(4), **vit.preprocessing), tmp_path / "store", **kw
        )
    qk = SpikeRateBackbone(_tiny("qkformer_hst_4_384"), "qkformer")
    with pytest.raises(StoreError, match="different widths"):  # stages of 8, 16, 32 channels
        extract_activations(qk, data, tmp_path / "qk", **kw)


@pytest.mark.parametrize(
    ("name", "img_size", "crop_pct"),
    [("vit_base_patch16_clip_quickgelu_224", 48, 1.0), ("vit_tiny_patch16_224", 48, 0.9)],
)
def test_vit_preprocessing_is_timms_own_for_the_model(name, img_size, crop_pct):
    """The CLIP crop (resize the short side, centre crop, crop_pct 1) for CLIP models, timm's crop_pct
    for others: against timm's create_transform on PIL images (square ones: the same pixels are kept)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = ViTBackbone(name, model_kwargs={"img_size": img_size, "depth": 1})
    assert bb.preprocessing["crop_pct"] == crop_pct and bb.preprocessing["interpolation"] == "bicubic"
    cfg = {**resolve_data_config({}, model=bb.vit), "input_size": (3, img_size, img_size)}
    timm_transform = create_transform(**cfg)
    source = EmbeddedImages(60)
    for i in range(0, 60, 6):
        img = source[i]
        ours, theirs = bb.preprocess(img), timm_transform(Image.fromarray(img))
        assert ours.shape == theirs.shape == (3, img_size, img_size)
        assert float((ours - theirs).abs().mean()) < 0.01  # resampling on floats vs PIL's uint8 only
        if crop_pct < 1:  # the CLIP crop would be far off: the crop is the model's own
            clip_crop = to_model_input(img, bb.img_size, bb.mean, bb.std)
            assert float((clip_crop - theirs).abs().mean()) > 0.02
