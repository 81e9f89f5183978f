"""Weights users already have: spikingjelly 2.0 Spikformer / SDT / QKFormer state dicts converted by the
public converter (library function and command line) or on the fly by ``create_model(name,
checkpoint_path=...)`` and ``torch.hub.load`` from this checkout give spikingjelly's own logits
(spikingjelly's models are the independent reference); native, Lightning-style and damaged or foreign
files."""

import contextlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import spikingjelly.activation_based.functional as sj_functional
import torch
from spikingjelly.activation_based.model import qkformer as sj_qkformer
from spikingjelly.activation_based.model import spike_driven_transformer as sj_sdt
from spikingjelly.activation_based.model import spikformer as sj_spikformer
from test_models import _compare_eval, _excite

from spikecore.models import create_model, list_models
from spikecore.models.convert import convert_spikingjelly_state_dict, detect_spikingjelly_arch, main
from spikecore.models.weights import read_state_dict, save_safetensors
from spikecore.serialization import CheckpointError

REPO = Path(__file__).resolve().parents[3]


def _sj_spikformer():
    # T=4 and a moderate BN shift: there, pooling before or after the LIF gives different spikes (at T=2
    # or with saturated LIFs the two commute), so the comparison sees the layout.
    sj = sj_spikformer.Spikformer(
        T=4, in_channels=3, img_size_h=16, img_size_w=16, patch_size=4, num_classes=5, embed_dims=32,
        num_heads=4, depths=2,
    )  # fmt: skip
    _excite(sj, seed=1, shift=1.0)
    for block in sj.blocks:  # 0.125 leaves the attention LIF silent at this size; exercise it
        block.attn.scale = 0.5
    return sj


def _sj_sdt():
    sj = sj_sdt.SpikeDrivenTransformer(
        T=2, in_channels=3, num_classes=5, embed_dims=32, num_heads=4, depths=2, pooling_stat="0011"
    )
    return _excite(sj, seed=2, shift=1.5)


def _sj_qkformer():
    sj = sj_qkformer.QKFormer(
        T=2, in_channels=3, num_classes=5, embed_dims=64, num_heads=(2, 4, 4), depths=(1, 2, 1)
    )
    return _excite(sj, seed=3, shift=1.0)


# arch -> (spikingjelly model, spikecore model name and overrides, input shape). No layout setting is passed:
# spikingjelly's (Spikformer's pool before the LIF, QKFormer's ImageNet stem) comes with the weights.
CASES = {
    "spikformer": (
        _sj_spikformer,
        "spikformer_4_384",
        dict(img_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5, T=4, attn_scale=0.5),
        (2, 3, 16, 16),
    ),
    "sdt": (
        _sj_sdt,
        "sdt_2_512",
        dict(img_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5, T=2),
        (2, 3, 16, 16),
    ),
    "qkformer": (
        _sj_qkformer,
        "qkformer_hst_4_384",
        dict(img_size=32, embed_dims=(16, 32, 64), depths=(1, 2, 1), num_heads=(2, 4, 4), num_classes=5, T=2),
        (2, 3, 32, 32),
    ),
}


@contextlib.contextmanager
def float64():
    """Models built in float64 (as the parity tests compare), so loading keeps every bit of the weights."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A spikingjelly model with random weights, its state dict saved as a torch file, and the input."""
    arch = request.param
    make, name, overrides, shape = CASES[arch]
    torch.manual_seed(0)
    sj = make().double()
    folder = tmp_path_factory.mktemp(arch)
    torch.save(sj.state_dict(), folder / "sj.pth")
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return dict(arch=arch, sj=sj, name=name, overrides=overrides, x=x, folder=folder)


def _load(case, path, **extra):
    with float64():
        return create_model(case["name"], checkpoint_path=path, backend="torch", **case["overrides"], **extra)


def _sj_last_block(sj: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """spikingjelly's output of its last block, ``[T, B, D, N]``."""
    last = sj.stage3[-1] if hasattr(sj, "stage3") else sj.blocks[-1]
    out = []
    hook = last.register_forward_hook(lambda mod, inp, o: out.append(o))
    sj.eval()
    sj_functional.reset_net(sj)
    with torch.no_grad():
        sj(x)
    hook.remove()
    return out[0].flatten(3)


def test_spikingjelly_file_loads_on_the_fly_with_the_same_logits(case):
    assert detect_spikingjelly_arch(case["sj"].state_dict()) == case["arch"]
    model = _load(case, case["folder"] / "sj.pth")
    assert next(model.parameters()).dtype == torch.float64
    _compare_eval(model, case["sj"], case["x"])
    # The features too (SDT's logits pass a LIF, which hides small differences; the features do not).
    with torch.no_grad():
        features = model.forward_features(model.to_sequence(case["x"]))
    torch.testing.assert_close(features, _sj_last_block(case["sj"], case["x"]), rtol=1e-10, atol=1e-12)
    if case["arch"] == "spikformer":  # the layout that came with the weights matters
        post = _load(case, case["folder"] / "sj.pth", pool_position="post").eval()
        with torch.no_grad():
            assert not torch.equal(post.forward_features(post.to_sequence(case["x"])), features)


def test_converted_file_cli_and_library_give_the_same_logits(case, capsys):
    out = case["folder"] / "converted.safetensors"
    assert main(["--input", str(case["folder"] / "sj.pth"), "--output", str(out)]) == 0
    assert case["arch"] in capsys.readouterr().out
    converted, metadata = read_state_dict(out)
    assert metadata["spikecore.source"] == "spikingjelly" and metadata["spikecore.arch"] == case["arch"]
    # The CLI wrote exactly what the library function returns.
    direct = convert_spikingjelly_state_dict(case["sj"].state_dict(), case["arch"])
    assert converted.keys() == direct.keys() and all(torch.equal(converted[k], direct[k]) for k in direct)
    _compare_eval(_load(case, out), case["sj"], case["x"])


def test_torch_hub_load_from_the_checkout(case):
    out = case["folder"] / "hub.safetensors"
    save_safetensors(
        convert_spikingjelly_state_dict(case["sj"].state_dict()),
        out,
        {"spikecore.source": "spikingjelly", "spikecore.arch": case["arch"]},
    )
    with float64():
        model = torch.hub.load(
            str(REPO),
            case["name"],
            source="local",
            checkpoint_path=str(out),
            backend="torch",
            **case["overrides"],
        )
    _compare_eval(model, case["sj"], case["x"])


def test_hubconf_has_one_entry_per_registered_model():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # What torch.hub.list reports for a checkout: the public callables.
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == list_models()
    assert "torch" in hubconf.dependencies


def test_training_script_containers_and_ddp_prefix(tmp_path):
    """spikingjelly's training scripts save ``{"model": ..., "epoch": ...}``, with ``module.`` under DDP."""
    torch.manual_seed(0)
    sj = _sj_sdt()
    wrapped = {"model": {f"module.{k}": v for k, v in sj.state_dict().items()}, "epoch": 7}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    model = create_model("sdt_2_512", checkpoint_path=tmp_path / "checkpoint.pth", **_sdt())
    expected = convert_spikingjelly_state_dict(sj.state_dict(), "sdt")
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_wrong_arch_is_one_clear_error(case):
    other = {"spikformer": "sdt", "sdt": "qkformer", "qkformer": "spikformer"}[case["arch"]]
    with pytest.raises(
        CheckpointError, match=f"expected spikingjelly {other} weights.*spikingjelly {case['arch']}"
    ):
        convert_spikingjelly_state_dict(case["sj"].state_dict(), other)
    other_name = CASES[other][1]
    with pytest.raises(CheckpointError, match=rf"spikingjelly {case['arch']} weights, but {other_name} is a"):
        create_model(other_name, checkpoint_path=case["folder"] / "sj.pth")
    # The right family at other sizes: the mismatch is named.
    with pytest.raises(CheckpointError, match=r"does not fit .*(missing|unexpected|other shapes) \[") as err:
        create_model(
            case["name"], checkpoint_path=case["folder"] / "sj.pth", **{**case["overrides"], "num_classes": 7}
        )
    assert "head." in str(err.value)


# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A tiny spikecore SDT with non-default weights, and the folder for its files."""
    torch.manual_seed(1)
    model = _excite(create_model("sdt_2_512", **_sdt()), seed=7)
    return model, tmp_path_factory.mktemp("native")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _sdt(**changes) -> dict:
    return {**CASES["sdt"][2], **changes}


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def test_native_safetensors_torch_and_lightning_files(native):
    model, folder = native
    sd = model.state_dict()
    files = {
        "model.safetensors": lambda p: save_safetensors(sd, p),
        "plain.pt": lambda p: torch.save(sd, p),
        # The Lightning classifier's checkpoint (network under "net."), and TDFormer's (under "net.backbone.",
        # beside weights of its own that the backbone ignores).
        "lightning.ckpt": lambda p: torch.save(
            {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 3}, p
        ),
        "tdformer.ckpt": lambda p: torch.save(
            {
                "state_dict": {
                    **{f"net.backbone.{k}": v for k, v in sd.items()},
                    "net.feedback.w": torch.ones(2),
                }
            },
            p,
        ),
    }
    for file, write in files.items():
        write(folder / file)
        loaded = create_model("sdt_2_512", checkpoint_path=folder / file, **_sdt())
        assert _same_weights(loaded, model), file
    with pytest.raises(CheckpointError, match=r"does not fit sdt_2_512 \(unexpected \['blocks\.1\."):
        create_model("sdt_2_512", checkpoint_path=folder / "model.safetensors", **_sdt(depth=1))


@pytest.mark.parametrize("file", ["model.safetensors", "plain.pt"])
def test_truncated_or_flipped_files_are_refused(native, file):
    model, folder = native
    path = folder / f"damaged-{file}"
    (save_safetensors if file.endswith("safetensors") else lambda sd, p: torch.save(sd, p))(
        model.state_dict(), path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"damaged-.*(corrupted|truncated|damaged)"):
        create_model("sdt_2_512", checkpoint_path=path, **_sdt())
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # inside a tensor's bytes
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted"):
        create_model("sdt_2_512", checkpoint_path=path, **_sdt())


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert main(["--input", str(tmp_path / "empty.pth"), "--output", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty" in err and err.count("\n") == 1
    torch.save({"patch_embed.proj.0.conv.weight": torch.ones(1)}, tmp_path / "native.pth")
    assert main(["--input", str(tmp_path / "native.pth"), "--output", str(tmp_path / "o.safetensors")]) == 2
    assert "not a spikingjelly" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_hubconf_works_without_spikecore_installed(tmp_path):
    """A fresh interpreter that cannot import spikecore (site-packages without the editable install's .pth):
    hubconf puts the checkout's source on the path itself."""
    out = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_safetensors(convert_spikingjelly_state_dict(_sj_sdt().state_dict()), out)
    script = (
        "import sys; sys.path.append(sys.argv[1]); import torch\n"
        "try:\n    import spikecore\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('spikecore importable')\n"
        "m = torch.hub.load(sys.argv[2], 'sdt_2_512', source='local', checkpoint_path=sys.argv[3],"
        " img_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5, T=2)\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run = subprocess.run(
        [sys.executable, "-S", "-c", script, sysconfig.get_paths()["purelib"], str(REPO), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == "SpikeDrivenTransformer"
