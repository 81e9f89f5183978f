"""The activation store: exact round trip, resume after a crash mid-shard, bounded memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from sae_brainmap.backbone import ViTBackbone
from sae_brainmap.store import ActivationStore, StoreError, extract_activations, layer_key

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32)


class RandomImages(torch.utils.data.Dataset):
    """Deterministic image tensors; records which indices were served and can fail at one of them."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.served = n, fail_at, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        self.served.append(i)
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))


@pytest.fixture(scope="module")
def backbone():
    with pytest.warns(UserWarning):
        return ViTBackbone(model_kwargs=TINY)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_is_exact_in_the_stored_dtype(backbone, dtype, tmp_path):
    data = RandomImages(10)
    store = extract_activations(
        backbone,
        data,
        tmp_path / "s",
        layers=[2, 0],
        dtype=dtype,
        images_per_shard=4,
        batch_size=3,
        progress=False,
    )
    assert store.complete and len(store.shards) == 3 and store.layers == [0, 2]
    images = torch.stack([data[i] for i in range(10)])
    streams = backbone(images)
    tdtype = getattr(torch, dtype)
    for layer in (0, 2):
        expected = streams[layer][:, 1:].reshape(-1, 32).to(tdtype)  # patch tokens, CLS dropped
        got = ActivationStore(tmp_path / "s").layer(layer)
        assert got.dtype == tdtype and got.shape == (10 * 4, 32)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # batches: every token exactly once, layers of one token kept together
    ordered = list(store.batches(8, shuffle=False))
    assert len(ordered) == 5
    torch.testing.assert_close(torch.cat([b[layer_key(2)] for b in ordered]), expected.float())
    shuffled = list(store.batches(8, shuffle=True, seed=1))
    cat0 = torch.cat([b[layer_key(0)] for b in shuffled])
    cat2 = torch.cat([b[layer_key(2)] for b in shuffled])
    ref0 = streams[0][:, 1:].reshape(-1, 32).to(tdtype).float()
    assert not torch.equal(cat0, ref0)
    key = lambda t: t[:, 0] * 1e3 + t[:, 1]  # noqa: E731 (a row fingerprint to sort by)
    torch.testing.assert_close(cat0[key(cat0).argsort()], ref0[key(ref0).argsort()])
    pairs = {(a.sum().item(), b.sum().item()) for a, b in zip(cat0, cat2, strict=True)}
    ref_pairs = {(a.sum().item(), b.sum().item()) for a, b in zip(ref0, expected.float(), strict=True)}
    assert pairs == ref_pairs  # a token's layers travel together


def test_cls_tokens_and_refusing_other_settings(backbone, tmp_path):
    store = extract_activations(
        backbone,
        RandomImages(5),
        tmp_path / "c",
        layers=[1],
        tokens="cls",
        images_per_shard=8,
        progress=False,
    )
    assert store.n_tokens == 5 and store.manifest["tokens_per_image"] == 1
    with pytest.raises(StoreError, match="other settings"):
        extract_activations(
            backbone, RandomImages(5), tmp_path / "c", layers=[0], tokens="cls", progress=False
        )
    with pytest.raises(StoreError, match="no manifest"):
        ActivationStore(tmp_path / "nothing")


def test_resume_after_a_crash_mid_shard(backbone, tmp_path):
    out = tmp_path / "crash"
    crashing = RandomImages(10, fail_at=6)  # shard 1 holds images 4..7: it dies half way through
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_activations(
            backbone, crashing, out, layers=[0, 1], images_per_shard=4, batch_size=1, progress=False
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0]
    half = out / "shard_00001.bin.tmp"
    assert half.is_file() and half.stat().st_size > 0  # the half-written shard is there ...
    partial = ActivationStore(out)
    assert partial.n_tokens == 4 * 4 and not partial.complete  # ... and never read
    assert len(list(partial.batches(4))) == 4

    resumed = RandomImages(10)
    store = extract_activations(
        backbone, resumed, out, layers=[0, 1], images_per_shard=4, batch_size=1, progress=False
    )
    assert sorted(resumed.served) == list(range(4, 10))  # shard 0 was not recomputed
    assert not list(out.glob("*.tmp")) and store.complete
    clean = extract_activations(
        backbone,
        RandomImages(10),
        tmp_path / "clean",
        layers=[0, 1],
        images_per_shard=4,
        batch_size=1,
        progress=False,
    )
    for layer in (0, 1):
        torch.testing.assert_close(store.layer(layer), clean.layer(layer), rtol=0, atol=0)

    # A shard whose size disagrees with the manifest (truncated on disk) is refused, not read.
    with open(out / "shard_00002.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="bytes on disk"):
        ActivationStore(out)


def test_memory_stays_bounded_while_extracting_more_than_the_budget(tmp_path):
    """Extract ~150 MB of activations in a fresh process; its peak RSS may grow by at most 60 MB."""
    script = textwrap.dedent(
        f"""
        import resource, warnings, torch
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        from sae_brainmap.backbone import ViTBackbone
        from sae_brainmap.store import extract_activations

        class Images(torch.utils.data.Dataset):
            def __len__(self): return 640
            def __getitem__(self, i): return torch.randn(3, 112, 112)

        bb = ViTBackbone(model_kwargs=dict(embed_dim=384, depth=6, num_heads=6, img_size=112))
        bb(torch.randn(16, 3, 112, 112))  # allocator warm-up at the batch size used below
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store = extract_activations(bb, Images(), r"{tmp_path / "big"}", images_per_shard=128,
                                    batch_size=16, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(store.n_tokens * 6 * 384 * 2, (peak - base) * 1024)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written, growth = map(int, proc.stdout.split())
    assert written > 140e6  # 640 images x 49 patches x 6 layers x 384 x 2 bytes
    assert growth < 60e6, f"peak RSS grew by {growth / 1e6:.0f} MB while writing {written / 1e6:.0f} MB"
