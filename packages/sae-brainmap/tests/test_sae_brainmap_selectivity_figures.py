"""ROI selectivity figures: patch maps recomputed for just the drawn images, the overlay, the layout and
bad input. (The figures inside a ``sae-brainmap run`` are tested with the pipeline, on its tiny run.)"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sae_brainmap.analysis.selectivity import latent_patch_maps
from sae_brainmap.backbone import ViTBackbone
from sae_brainmap.figures import LatentRow, display_image, save_figure, selectivity_figure
from sae_brainmap.pipeline import _selectivity_rows
from sae_brainmap.run_config import RunConfigError, load_run_config
from sae_brainmap.sae import make_sae


class RecordingSource:
    """An image source that remembers which images were read."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images, self.read = images, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        self.read.append(i)
        return self.images[i]


@pytest.fixture(scope="module")
def tiny_vit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        torch.manual_seed(0)
        return ViTBackbone("vit_tiny_patch16_224", model_kwargs={"img_size": 48})  # a 3 x 3 patch grid


def _hooked_patch_codes(bb: ViTBackbone, sae, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The SAE codes ``[B, patches, U]`` of a block's output, caught by a hook on timm's own forward."""
    caught = {}
    handle = bb.vit.blocks[layer].register_forward_hook(lambda _m, _i, out: caught.setdefault("x", out))
    with torch.no_grad():
        bb.vit.forward_features(x)
        handle.remove()
        tokens = caught["x"][:, bb.vit.num_prefix_tokens :]
        return sae.encode(tokens.reshape(-1, tokens.shape[-1])).reshape(*tokens.shape[:2], -1)


def test_latent_patch_maps_equal_the_hooked_forward_and_read_only_the_requested_images(tiny_vit):
    bb = tiny_vit
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 7 * i, 56, 3), dtype=np.uint8) for i in range(6)]
    saes = {lay: make_sae("topk", bb.embed_dim, 32, init_seed=lay, k=8) for lay in (1, 3)}
    wanted = [0, 2, 5]
    x = torch.stack([bb.preprocess(images[i]) for i in wanted])  # timm's transform for the model
    ref = {lay: _hooked_patch_codes(bb, saes[lay], x, lay) for lay in saes}
    # per image and layer its most active latent (a map worth checking) and one fixed latent
    requests = []
    for b, img in enumerate(wanted):
        for lay in saes:
            requests += [(lay, int(ref[lay][b].sum(0).argmax()), img), (lay, 7, img)]
    source = RecordingSource(images)
    maps = latent_patch_maps(bb, saes, source, requests, batch_size=2)  # two batches
    assert set(maps) == set(requests)
    assert sorted(source.read) == wanted  # each requested image read once, no other image
    for lay, latent, img in requests:
        expected = ref[lay][wanted.index(img), :, latent].double().reshape(3, 3).numpy()  # raster order
        np.testing.assert_allclose(maps[(lay, latent, img)], expected, rtol=1e-5, atol=1e-6)
    assert all(maps[(lay, int(ref[lay][0].sum(0).argmax()), 0)].max() > 0 for lay in saes)


def _rows(n_images: list[int], grid=(4, 4), size=(64, 64), seed=0) -> list[LatentRow]:
    rng = np.random.default_rng(seed)
    return [
        LatentRow(
            layer=3 * j,
            latent=100 + j,
            mean_r=0.5 - 0.1 * j,
            image_ids=list(range(10 * j, 10 * j + n)),
            images=[rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)],
            patch_maps=[rng.random(grid) * (j + 1) for _ in range(n)],
        )
        for j, n in enumerate(n_images)
    ]


def _panels(fig) -> list:
    """The image panels: axes holding a photograph and its overlay."""
    return [ax for ax in fig.get_axes() if len(ax.get_images()) == 2]


def test_overlay_is_the_patch_map_upsampled_bilinearly_on_one_scale_per_row():
    rows = _rows([3, 3], grid=(3, 5), size=(60, 100))
    fig = selectivity_figure("FFA", rows)
    panels = _panels(fig)
    assert len(panels) == 6
    for k, ax in enumerate(panels):
        row = rows[k // 3]
        photo, overlay = ax.get_images()
        np.testing.assert_array_equal(photo.get_array(), row.images[k % 3])
        # independent reference: PIL's bilinear resize (pixel centres, edge clamped) of the patch grid
        grid = Image.fromarray(row.patch_maps[k % 3].astype(np.float32), mode="F")
        expected = np.asarray(grid.resize((100, 60), Image.BILINEAR))
        np.testing.assert_allclose(np.asarray(overlay.get_array()), expected, rtol=1e-5, atol=1e-5)
        assert overlay.norm.vmin == 0
        assert overlay.norm.vmax == pytest.approx(max(m.max() for m in row.patch_maps))
        assert overlay.get_cmap()(0.0)[3] == 0  # no activation: the photograph shows through
        assert 0 < overlay.get_cmap()(1.0)[3] < 1


def test_figure_has_a_titled_row_per_latent_and_a_panel_per_image(tmp_path):
    rows = _rows([5, 2, 4])  # fewer images for some latents: their empty slots are removed
    fig = selectivity_figure("V1", rows, subtitle="random weights", n_voxels=123)
    assert len(_panels(fig)) == 11
    assert fig.get_suptitle().startswith("V1: top 3 latents by mean r over its 123 voxels")
    assert "random weights" in fig.get_suptitle()
    row_titles = [sub.get_suptitle() for sub in fig.subfigs]
    assert row_titles == [f"layer {r.layer} · latent {r.latent} · mean r = {r.mean_r:.3f}" for r in rows]
    for sub, row in zip(fig.subfigs, rows, strict=True):
        titles = [ax.get_title() for ax in _panels(sub)]
        assert [t.split()[1] for t in titles] == [str(i) for i in row.image_ids]
    path = save_figure(fig, tmp_path / "fig" / "v1.png", dpi=50)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == tuple(round(v * 50) for v in fig.get_size_inches())
    one_row = selectivity_figure("V1", rows[:1])
    assert one_row.get_size_inches()[1] < fig.get_size_inches()[1]
    assert one_row.get_suptitle().startswith("V1: top 1 latent by mean r")


def test_pipeline_rows_leave_out_top_images_a_sparse_latent_is_silent_on():
    entries = [
        {"layer": 2, "latent": 7, "mean_r": 0.3, "top_images": [4, 1, 0], "top_activations": [2.0, 0.5, 0.0]},
        {"layer": 5, "latent": 9, "mean_r": 0.2, "top_images": [3, 2, 1], "top_activations": [1.0, 1.0, 0.2]},
        {"layer": 5, "latent": 8, "mean_r": 0.1, "top_images": [0, 1, 2], "top_activations": [0.0, 0.0, 0.0]},
    ]
    shown = {i: np.full((8, 8, 3), i, np.uint8) for i in range(5)}
    maps = {(e["layer"], e["latent"], i): np.full((2, 2), 10.0 * i) for e in entries for i in e["top_images"]}
    rows = _selectivity_rows(entries, shown, maps)
    assert [r.image_ids for r in rows] == [[4, 1], [3, 2, 1], [0, 1, 2]]
    assert [r.note for r in rows] == ["active on 2 images only", "", "silent on every image"]
    assert [int(r.images[0][0, 0, 0]) for r in rows] == [4, 3, 0]
    assert [float(r.patch_maps[-1][0, 0]) for r in rows] == [10.0, 10.0, 20.0]
    fig = selectivity_figure("OFA", rows)
    assert len(_panels(fig)) == 8
    assert fig.subfigs[0].get_suptitle().endswith("mean r = 0.300 · active on 2 images only")


def test_display_image_is_the_centre_crop_the_model_sees():
    img = np.zeros((60, 100, 3), np.uint8)
    img[:, :20] = img[:, 80:] = (255, 0, 0)  # red borders outside the centred 60 x 60 square
    img[:, 20:80] = (0, 0, 255)
    shown = display_image(img, (32, 32))
    assert shown.shape == (32, 32, 3) and shown.dtype == np.uint8
    inner = shown[:, 2:-2].astype(int)
    assert inner[..., 0].max() < 10 and inner[..., 2].min() > 245
    assert shown[..., 0].mean() < 20  # no red border column was kept


def test_bad_input_gives_one_clear_message(tiny_vit, tmp_path):
    with pytest.raises(ValueError, match="ROI PPA: no latents to draw"):
        selectivity_figure("PPA", [])
    rows = _rows([3])
    rows[0].patch_maps.pop()
    with pytest.raises(ValueError, match="3 image ids, 3 images and 2 patch maps"):
        selectivity_figure("FFA", rows)
    source = RecordingSource([np.zeros((48, 48, 3), np.uint8)] * 3)
    saes = {1: make_sae("topk", tiny_vit.embed_dim, 16, init_seed=0, k=4)}
    with pytest.raises(ValueError, match=r"image\(s\) \[7\] out of range: the image source has 3 images"):
        latent_patch_maps(tiny_vit, saes, source, [(1, 0, 7)])
    with pytest.raises(ValueError, match=r"no SAE for layer\(s\) \[2\]"):
        latent_patch_maps(tiny_vit, saes, source, [(2, 0, 0)])
    assert source.read == []  # checked before any image is read
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("analysis:\n  selectivity_latents: 0\n")
    with pytest.raises(RunConfigError, match=r"analysis\.selectivity_latents must be at least 1"):
        load_run_config(cfg)
