"""The activation store records what made it: other settings are refused (naming them) or rebuilt, the same
settings reuse or resume the store."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sae_brainmap.backbone import ViTBackbone
from sae_brainmap.cli import main
from sae_brainmap.images import EmbeddedImages, FolderImages, ImageDataset
from sae_brainmap.store import ActivationStore, StoreError, extract_activations
from spikecore.errors import UserError

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _backbone(seed: int = 0, **over) -> ViTBackbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        torch.manual_seed(seed)
        return ViTBackbone(model_kwargs={**TINY, **over})


class Counting(ImageDataset):
    """An ImageDataset that counts which images were read and can fail at one index (a crash)."""

    def __init__(self, inner: ImageDataset, fail_at: int | None = None) -> None:
        super().__init__(inner.source, inner.size, inner.mean, inner.std)
        self.fail_at, self.served = fail_at, []

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        self.served.append(i)
        return super().__getitem__(i)


def _images(bb: ViTBackbone, n: int = 6, seed: int = 0, size=None) -> ImageDataset:
    return ImageDataset(EmbeddedImages(n, seed), size or bb.img_size, bb.mean, bb.std)


def _extract(bb, data, out, **kw):
    kw = {"layers": [0, 2], "images_per_shard": 4, "batch_size": 2, "progress": False, **kw}
    return extract_activations(bb, data, out, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A complete store of 6 embedded images (seed 0) from a tiny random ViT drawn from seed 0."""
    out = tmp_path_factory.mktemp("prov") / "store"
    bb = _backbone()
    store = _extract(bb, _images(bb), out)
    return out, bb, store


def test_a_complete_store_with_the_same_settings_is_reused_without_running_the_backbone(made):
    out, _, store = made
    assert store.complete and store.manifest["provenance"]["images"]["source"] == {
        "kind": "embedded", "n_images": 6, "seed": 0, "originals": len(EmbeddedImages(1).originals)
    }  # fmt: skip
    before = _snapshot(out)
    bb = _backbone()  # the same weights, drawn again from the same seed
    calls = []
    bb.vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    data = Counting(_images(bb))
    again = _extract(bb, data, out, provenance=None)
    assert calls == [] and data.served == [] and again.complete
    assert _snapshot(out) == before


def _refused(out: Path, bb, data, *names: str, **kw) -> str:
    before = _snapshot(out)
    calls = []
    bb.vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(StoreError) as err:
        _extract(bb, data, out, **kw)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert message.startswith(f"activation store {out} was made with other settings: ")
    assert "Use a new store folder, or rebuild this one" in message and "rebuild: true" in message
    for name in names:
        assert f"{name} (store " in message, (name, message)
    assert calls == [] and _snapshot(out) == before  # refused before any work; nothing touched
    return message


def test_each_setting_that_determines_the_content_is_checked_and_named(made):
    out, bb, _ = made
    message = _refused(out, bb, _images(bb, n=8), "n_images", "images.source.n_images")
    assert "n_images (store 6, now 8)" in message
    _refused(out, bb, _images(bb, seed=1), "images.source.seed")
    _refused(out, bb, _images(bb, size=(48, 48)), "images.size")
    _refused(out, _backbone(seed=1), _images(bb), "backbone_weights")  # other (random) weights
    bigger = _backbone(img_size=48)  # another input size: other position embeddings and images
    _refused(out, bigger, _images(bigger), "images.size", "backbone_weights")
    other = _backbone()
    other.name = "vit_base_patch16_224"
    _refused(out, other, _images(bb), "backbone")
    _refused(out, bb, _images(bb), "layers", layers=[0, 1])
    _refused(out, bb, _images(bb), "tokens", tokens="cls")
    _refused(out, bb, _images(bb), "dtype", dtype="bfloat16")
    _refused(out, bb, _images(bb), "extra.stimuli", provenance={"stimuli": "v2"})


def test_rebuild_replaces_a_store_made_with_other_settings(made, tmp_path):
    src, bb, _ = made
    out = tmp_path / "store"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "notes.txt").write_text("mine")  # not the store's: left alone
    rebuilt = _extract(bb, _images(bb, n=8, seed=3), out, rebuild=True)
    fresh = _extract(bb, _images(bb, n=8, seed=3), tmp_path / "fresh")
    assert rebuilt.complete and rebuilt.manifest["n_images"] == 8
    assert rebuilt.manifest["provenance"] == fresh.manifest["provenance"]
    for layer in (0, 2):
        torch.testing.assert_close(rebuilt.layer(layer), fresh.layer(layer), rtol=0, atol=0)
    assert sorted(p.name for p in out.glob("shard_*.bin")) == ["shard_00000.bin", "shard_00001.bin"]
    assert (out / "notes.txt").read_text() == "mine"
    # rebuild with the same settings keeps (reuses) the store
    mtime = (out / "shard_00000.bin").stat().st_mtime_ns
    _extract(bb, _images(bb, n=8, seed=3), out, rebuild=True)
    assert (out / "shard_00000.bin").stat().st_mtime_ns == mtime


def test_an_interrupted_store_resumes_with_the_same_settings_and_is_refused_with_others(tmp_path):
    bb = _backbone()
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _extract(bb, Counting(_images(bb, n=10), fail_at=6), out)
    assert not ActivationStore(out).complete and (out / "shard_00001.bin.tmp").is_file()
    message = _refused(out, bb, _images(bb, n=10, seed=5), "images.source.seed")
    assert (out / "shard_00001.bin.tmp").is_file()  # the refusal did not even clean up
    resumed = Counting(_images(bb, n=10))
    store = _extract(bb, resumed, out)
    assert sorted(set(resumed.served)) == list(range(4, 10)) and store.complete  # shard 0 kept
    clean = _extract(bb, _images(bb, n=10), tmp_path / "clean")
    torch.testing.assert_close(store.layer(2), clean.layer(2), rtol=0, atol=0)
    assert "seed" in message


def test_a_store_without_provenance_or_with_a_foreign_manifest_is_refused(made, tmp_path):
    src, bb, _ = made
    old = tmp_path / "old"
    old.mkdir()
    for f in src.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["provenance"]  # what the previous version wrote
    (old / "manifest.json").write_text(json.dumps(manifest))
    message = _refused(old, bb, _images(bb))
    assert "provenance (the store records none: it was written by an older version)" in message
    assert ActivationStore(old).complete  # still readable as it is
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(StoreError, match=r"not a sae_brainmap\.store/1 manifest"):
        _extract(bb, _images(bb), foreign, rebuild=True)
    assert (foreign / "manifest.json").read_text() == '{"format": "something else"}'
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _extract(bb, _images(bb), a_file)


def _png(path: Path, value: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_folder_images_are_identified_by_names_and_sizes_not_by_their_times(tmp_path):
    bb = _backbone()
    folder = tmp_path / "images"
    for i in range(3):
        _png(folder / "sub" / f"{i}.png", i)

    def data():
        return ImageDataset(FolderImages(folder), bb.img_size, bb.mean, bb.std)

    out = tmp_path / "store"
    _extract(bb, data(), out)
    os.utime(folder / "sub" / "1.png", (1, 1))  # touched, or copied elsewhere: same content
    assert _extract(bb, data(), out).complete
    _png(folder / "sub" / "1.png", 7, size=44)  # another image in its place
    _refused(out, bb, data(), "images.source.files.names_and_sizes")
    _png(folder / "sub" / "3.png", 3)
    _refused(out, bb, data(), "n_images", "images.source.files.count")


def _fit_config(tmp_path: Path, n_images: int, rebuild: bool = False) -> Path:
    data = {"store": str(tmp_path / "store"), "source": "embedded", "n_images": n_images, "batch_size": 4,
            "images_per_shard": 4, "rebuild": rebuild}  # fmt: skip
    cfg = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "enable_progress_bar": False,
            "logger": False,
        },
        "model": {"backbone_kwargs": TINY, "expansion": 2, "k": 4},
        "data": {"class_path": "sae_brainmap.StoreDataModule", "init_args": data},
    }
    cfg["trainer"]["default_root_dir"] = str(tmp_path / f"runs_{n_images}_{rebuild}")  # one run folder each
    path = tmp_path / f"fit_{n_images}_{rebuild}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_from_a_store_refuses_other_settings_with_one_line_and_rebuilds_on_request(tmp_path, capsys):
    """`sae-brainmap fit` with a StoreDataModule, through the console script's entry point."""

    def args(n_images: int, rebuild: bool = False) -> list[str]:
        over = _fit_config(tmp_path, n_images, rebuild)
        return ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(over)]

    main(args(8))
    store = tmp_path / "store"
    assert ActivationStore(store).manifest["n_images"] == 8
    before = _snapshot(store)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args(12))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert "n_images (store 8, now 12)" in lines[0] and "--data.init_args.rebuild true" in lines[0]
    assert _snapshot(store) == before
    main(args(12, rebuild=True))
    assert ActivationStore(store).manifest["n_images"] == 12 and ActivationStore(store).complete
