"""Backbone weights from untrusted files: TorchScript archives read without running them, pickles and URLs
refused, NaN weights refused."""

import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from spikecore_testing import Payload, serve_folder
from torch import nn

from sae_brainmap.backbone import DEFAULT_BACKBONE, BackboneWeightsError, ViTBackbone
from sae_brainmap.torchscript import TorchScriptReadError, is_torchscript_archive, read_torchscript_state_dict
from spikecore.serialization import CheckpointError

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("running", torch.arange(5.0))
        self.scale = 2.0

    def forward(self, x):
        return self.lin(x) * self.scale


class _Model(nn.Module):
    """Parameters, buffers (fp16, int64), a non-contiguous parameter, nested and indexed submodules, a
    module with optional (None) parameters, and a plain tensor attribute that is not in the state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()
        self.seq = nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2))
        self.transposed = nn.Parameter(torch.randn(3, 2).t())
        self.register_buffer("fp16", torch.randn(3).half())
        self.register_buffer("count", torch.tensor([7, 8], dtype=torch.int64))
        self.attn = nn.MultiheadAttention(4, 2)
        self.plain = torch.ones(2)

    def forward(self, x):
        h = self.inner(x)
        a = self.attn(h[None], h[None], h[None])[0][0]
        return self.seq(h + a).sum() + self.transposed.sum() + self.fp16.float().sum() + self.plain.sum()


def _jit_save(module: nn.Module, path: Path, how: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.randn(2, 3))
        torch.jit.save(scripted, str(path))
    return path


def _jit_reference(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


@pytest.mark.parametrize("how", ["script", "trace"])
def test_reader_gives_exactly_the_state_dict_torch_jit_load_gives(how, tmp_path, monkeypatch):
    path = _jit_save(_Model(), tmp_path / f"{how}.pt", how)
    reference = _jit_reference(path)  # the file is our own: torch.jit.load is the reference here
    assert is_torchscript_archive(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reader must not use torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    got = read_torchscript_state_dict(path)
    assert set(got) == set(reference)
    assert "plain" not in got and "attn.q_proj_weight" not in got  # not a parameter / a None parameter
    for name, ref in reference.items():
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
        assert got[name].stride() == ref.stride(), name
        torch.testing.assert_close(got[name], ref, rtol=0, atol=0)
    assert got["fp16"].dtype == torch.float16 and got["count"].tolist() == [7, 8]
    assert not got["transposed"].is_contiguous()


class _OpenAIStyle(nn.Module):
    """A module tree with OpenAI CLIP's state-dict names (``visual.conv1.weight``, ...): what their
    TorchScript ViT-B-16.pt holds."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in state.items():
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(value.clone()))

    def forward(self, x):
        return x


def test_an_openai_style_torchscript_archive_gives_the_source_models_streams(tmp_path):
    from test_sae_brainmap_backbone import _reference_streams, _to_openai

    source = timm.create_model(DEFAULT_BACKBONE, pretrained=False, num_classes=0, **TINY).eval()
    path = _jit_save(_OpenAIStyle(_to_openai(source.state_dict())), tmp_path / "ViT-B-16.pt", "script")
    bb = ViTBackbone(checkpoint=str(path), model_kwargs=TINY)
    images = torch.randn(2, 3, 32, 32)
    ref, _ = _reference_streams(source, images)
    streams = bb(images)
    for i in range(3):
        torch.testing.assert_close(streams[i], ref[i])


def _replace_member(src: Path, dst: Path, member_suffix: str, data: bytes | None) -> Path:
    """A copy of the zip ``src`` with the member ending in ``member_suffix`` replaced (or dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(member_suffix):
                if data is not None:
                    zout.writestr(info.filename, data)
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    return dst


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_a_torchscript_archive_with_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    good = _jit_save(_Model(), tmp_path / "good.pt", "script")
    marker = tmp_path / "pwned"
    evil = _replace_member(good, tmp_path / "evil.pt", "/data.pkl", pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(TorchScriptReadError, match=r"refers to __builtin__\.getattr.*refused"):
        read_torchscript_state_dict(evil)
    with pytest.raises(BackboneWeightsError, match="refused"):
        ViTBackbone(checkpoint=str(evil), model_kwargs=TINY)
    assert not marker.exists()

    # eval, which a plain unpickler would call, is refused the same way
    payload = pickle.dumps(_CallsEval(), protocol=2)
    assert pickle.loads(payload) == 2  # the payload really calls eval when unpickled normally
    sneaky = _replace_member(good, tmp_path / "eval.pt", "/data.pkl", payload)
    with pytest.raises(TorchScriptReadError, match=r"__builtin__\.eval"):
        read_torchscript_state_dict(sneaky)
    # an allowed global may be called, never changed: BUILD on the tensor rebuild function is refused
    build = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x08\x00\x00\x00__call__K\x01sb."
    tamper = _replace_member(good, tmp_path / "tamper.pt", "/data.pkl", build)
    with pytest.raises(TorchScriptReadError, match="change an object it did not create"):
        read_torchscript_state_dict(tamper)


def test_damaged_torchscript_archives_are_refused(tmp_path):
    good = _jit_save(_Model(), tmp_path / "good.pt", "script")
    short = _replace_member(good, tmp_path / "short.pt", "/data/0", b"\x00\x00")
    with pytest.raises(TorchScriptReadError, match="holds 2 bytes"):
        read_torchscript_state_dict(short)
    missing = _replace_member(good, tmp_path / "missing.pt", "/data/0", None)
    with pytest.raises(TorchScriptReadError, match="lacks the storage"):
        read_torchscript_state_dict(missing)
    # a flipped byte in a stored tensor: the zip checksum catches it before anything is read
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/0")))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 1] ^= 0xFF  # a byte of the member's data
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(BackboneWeightsError, match="checksum"):
        ViTBackbone(checkpoint=str(flipped), model_kwargs=TINY)


def test_plain_pickles_urls_and_nan_weights_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "x": Payload(marker)}, evil)
    with pytest.raises(BackboneWeightsError, match="cannot read backbone weights") as err:
        ViTBackbone(checkpoint=str(evil), model_kwargs=TINY)
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, ValueError)
    assert not marker.exists()

    (tmp_path / "served").mkdir()
    torch.save(
        timm.create_model(DEFAULT_BACKBONE, num_classes=0, **TINY).state_dict(), tmp_path / "served" / "w.pt"
    )
    with serve_folder(tmp_path / "served") as (url, requests):
        with pytest.raises(BackboneWeightsError, match="is a URL"):
            ViTBackbone(checkpoint=f"{url}/w.pt", model_kwargs=TINY)
    assert requests == []  # nothing was downloaded

    state = timm.create_model(DEFAULT_BACKBONE, pretrained=False, num_classes=0, **TINY).state_dict()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    nan = tmp_path / "nan.pt"
    torch.save(state, nan)
    with pytest.raises(
        BackboneWeightsError, match=r"NaN or infinite values in 'blocks\.1\.attn\.qkv\.weight'"
    ):
        ViTBackbone(checkpoint=str(nan), model_kwargs=TINY)
    from safetensors.torch import save_file

    state["blocks.1.attn.qkv.weight"][0, 0] = float("inf")
    inf = tmp_path / "inf.safetensors"
    save_file(state, str(inf))
    with pytest.raises(BackboneWeightsError, match="NaN or infinite"):
        ViTBackbone(checkpoint=str(inf), model_kwargs=TINY)
