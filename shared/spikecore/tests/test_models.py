"""spikecore.models: every backbone builds and trains at a tiny size, published parameter counts,
parity with spikingjelly's independent implementations, stateful segments and the feedback extras."""

import pytest
import spikingjelly.activation_based.functional as sj_functional
import spikingjelly.activation_based.layer as sj_layer
import torch
from spikingjelly.activation_based.model import qkformer as sj_qkformer
from spikingjelly.activation_based.model import spike_driven_transformer as sj_sdt
from spikingjelly.activation_based.model import spikformer as sj_spikformer
from torch import nn

from spikecore.models import (
    QKFormer,
    SpikeDrivenTransformer,
    Spikformer,
    create_model,
    list_models,
    register_model,
    registry,
)
from spikecore.models.convert import convert_spikingjelly_state_dict
from spikecore.neuron.module import reset

# Tiny variants of every registered model: (overrides, input shape). 5-D inputs are [T, B, C, H, W].
TINY = {
    "spikformer_4_384": (dict(img_size=16, embed_dim=32, depth=2, num_heads=4, T=2), (2, 3, 16, 16)),
    "spikformer_2_256_dvs": (dict(img_size=32, embed_dim=32, depth=1, num_heads=4), (2, 2, 2, 32, 32)),
    "sdt_2_512": (dict(img_size=16, embed_dim=32, num_heads=4, T=2), (2, 3, 16, 16)),
    "sdt_2_256": (dict(img_size=32, embed_dim=32, num_heads=4), (2, 2, 2, 32, 32)),
    "qkformer_hst_4_384": (dict(img_size=16, embed_dims=(16, 32, 64), num_heads=4, T=2), (2, 3, 16, 16)),
    "qkformer_hst_2_256": (dict(img_size=32, embed_dims=(32, 64), num_heads=4), (2, 2, 2, 32, 32)),
    "qkformer_hst_10_768": (
        dict(img_size=32, embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=4, T=2),
        (2, 3, 32, 32),
    ),
}


def _excite(model: nn.Module, seed: int = 0, shift: float = 0.8) -> nn.Module:
    """Random BN affine/statistics with positive shifts, so that the LIFs of a tiny random model fire."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 1 + 0.3 * torch.randn(n, generator=g).to(m.weight)
            m.bias.data = shift + 0.4 * torch.randn(n, generator=g).to(m.weight)
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def _mixed(t: torch.Tensor) -> None:
    """A comparison is only worth something if the tensor is neither constant nor all zero."""
    assert t.abs().sum() > 0 and t.std() > 0


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
def test_tiny_table_covers_registry():
    own = [n for n in list_models() if _registered_by(n) == "spikecore"]
    assert sorted(TINY) == own


def _registered_by(name: str) -> str:
    return registry._BUILDERS[name].__module__.split(".")[0]


def test_packages_register_into_the_one_registry_through_entry_points():
    """tdformer and spiliformer (installed in the workspace) add their models to spikecore's registry;
    spikecore finds them by entry point, never by importing the packages by name."""
    names = list_models()
    assert {"tdformer_spikformer_4_384", "spiliformer_4_384"} <= set(names)
    assert {_registered_by(n) for n in names} == {"spikecore", "tdformer", "spiliformer"}
    assert list_models("tdformer_*") == [n for n in names if n.startswith("tdformer_")]  # shell globs
    assert list_models("*_4_384") == [n for n in names if n.endswith("_4_384")]
    assert list_models("qkformer") == []  # a pattern, not a substring


def test_register_model_is_idempotent_and_refuses_a_second_builder(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))

    def my_net(**overrides):
        return nn.Linear(2, 2)

    assert register_model(my_net) is my_net
    assert register_model(my_net) is my_net  # a module imported twice (an import and an entry point)
    assert register_model(name="my_other_net")(my_net) is my_net
    assert isinstance(create_model("my_other_net"), nn.Linear)

    def other(**overrides):
        return nn.Linear(2, 2)

    other.__name__ = "my_net"
    with pytest.raises(ValueError, match="already registered"):
        register_model(other)


def test_entry_points_load_once_lazily_and_a_broken_one_only_warns(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    calls = []

    class EntryPoint:
        def __init__(self, name, fn):
            self.name, self.value, self.fn = name, f"plugin_{name}:register", fn

        def load(self):
            return self.fn

    def register():
        calls.append("ok")
        register_model(name="plugin_net")(lambda **kw: nn.Identity())

    def broken():
        raise ImportError("no module named plugin_dependency")

    found = [EntryPoint("broken", broken), EntryPoint("good", register)]

    def entry_points(group):
        return found if group == "spikecore.models" else []

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)
    with pytest.warns(RuntimeWarning, match="'broken'.*no module named plugin_dependency"):
        model = create_model("plugin_net")  # an unknown name loads the entry points
    assert isinstance(model, nn.Identity) and calls == ["ok"]
    assert "plugin_net" in list_models() and calls == ["ok"]  # loaded once


@pytest.mark.parametrize("name", sorted(TINY))
def test_builds_runs_forward_and_backward(name):
    torch.manual_seed(0)
    overrides, shape = TINY[name]
    model = _excite(create_model(name, backend="torch", **overrides))
    x = torch.rand(shape)
    out = model(x)
    assert out.shape == (shape[-4], model.num_classes)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Gradient reaches the first conv of the stem through every LIF (surrogate) on the way.
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0
    # The declared per-block dims / tokens describe what the model computes.
    seq = x if x.dim() == 5 else x.unsqueeze(0).repeat(model.T, 1, 1, 1, 1)
    feats = model.forward_features(seq)
    assert feats.shape == (seq.shape[0], seq.shape[1], model.num_features, model.block_tokens[-1])
    assert model.default_feedback_blocks == [
        i for i in range(len(model.blocks)) if model.block_dims[i] == model.num_features
    ]


def test_forward_is_features_then_head():
    torch.manual_seed(0)
    for name in ("spikformer_4_384", "sdt_2_512", "qkformer_hst_4_384"):
        overrides, shape = TINY[name]
        model = _excite(create_model(name, backend="torch", **overrides)).eval()
        x = torch.rand(shape)
        seq = torch.stack([x] * model.T)  # direct coding: the image at every step
        expected = model.forward_head(model.forward_features(seq))
        _mixed(expected)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(seq[:1]), model.forward_head(model.forward_features(seq[:1])))


@pytest.mark.parametrize(
    "name, published, overrides",
    [
        ("spikformer_4_384", 9.32e6, {}),
        ("spikformer_2_256_dvs", 2.57e6, {}),
        ("sdt_2_512", 10.28e6, {}),
        ("sdt_2_256", 2.57e6, {}),
        ("qkformer_hst_4_384", 6.74e6, {}),
        ("qkformer_hst_2_256", 1.50e6, {}),
        ("qkformer_hst_10_768", 64.96e6, {}),
    ],
)
def test_published_parameter_counts(name, published, overrides):
    n = _n_params(create_model(name, **overrides))
    assert abs(n / published - 1) < 0.01, f"{name}: {n} parameters vs published {published:.0f}"


def test_block_tokens_match_the_papers():
    assert create_model("spikformer_4_384").block_tokens == [64] * 4
    assert create_model("spikformer_2_256_dvs").block_tokens == [64] * 2
    assert create_model("sdt_2_256").block_tokens == [256] * 2
    assert create_model("sdt_2_512").block_tokens == [64] * 2
    hst = create_model("qkformer_hst_4_384")
    assert (hst.block_dims, hst.block_tokens) == ([96, 192, 384, 384], [1024, 256, 64, 64])
    assert hst.default_feedback_blocks == [2, 3] and hst.num_features == 384
    dvs = create_model("qkformer_hst_2_256")
    assert (dvs.block_dims, dvs.block_tokens) == ([128, 256], [256, 64])
    big = create_model("qkformer_hst_10_768")
    assert big.block_tokens == [56 * 56, 28 * 28, 28 * 28] + [14 * 14] * 7
    assert big.default_feedback_blocks == list(range(3, 10))


def test_registry_errors():
    with pytest.raises(ValueError, match="spikformer_4_384"):
        create_model("spikformer_4_348")
    with pytest.raises(ValueError, match="embed_dim"):
        create_model("spikformer_4_384", embed_dims=64)
    with pytest.raises(ValueError, match="unknown attention kind"):
        create_model("qkformer_hst_4_384", attn=("qkta", "qkta", "softmax"))
    assert list_models("qkformer*") == ["qkformer_hst_10_768", "qkformer_hst_2_256", "qkformer_hst_4_384"]


def test_attention_kind_per_stage_is_configurable():
    model = create_model("qkformer_hst_4_384", attn=("ff_lidiff", "ff_lidiff", "fb_lidiff"))
    kinds = [type(b.attn).__name__ for b in model.blocks]
    assert kinds == ["FFLiDiffAttention", "FFLiDiffAttention", "FBLiDiffAttention", "FBLiDiffAttention"]
    # Same projections as QKTA / SSA: the parameter count does not change.
    assert _n_params(model) == _n_params(create_model("qkformer_hst_4_384"))


def test_neuron_options_reach_every_lif():
    from spikecore import LIF

    model = create_model("qkformer_hst_4_384", **TINY["qkformer_hst_4_384"][0], stateful=True, tau=3.0)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert lifs and all(m.stateful and m.tau == 3.0 and m.backend == "auto" for m in lifs)
    assert all(m.detach_reset and m.v_reset == 0.0 for m in lifs)
    assert {m.v_threshold for m in lifs} == {1.0, 0.5}  # 0.5 only after the attention maps


# ---------------------------------------------------------------------------------------------------------
# Parity with spikingjelly (an independent implementation): state dicts mapped by name with the library's
# converter (spikecore.models.convert; its file / create_model / torch.hub paths: test_models_convert.py).


def _weight_count(model: nn.Module) -> int:
    """Parameters without conv / linear biases (the implementations differ only in which convs have one)."""
    total = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name == "bias" and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                continue
            total += p.numel()
    return total


def _load_converted(ours: nn.Module, sj: nn.Module, arch: str) -> None:
    """spikingjelly's weights into ``ours`` through the library's converter, strictly."""
    ours.load_state_dict(convert_spikingjelly_state_dict(sj.state_dict(), arch), strict=True)


def _compare_eval(ours: nn.Module, sj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of both models agree, and every attention LIF of ours fired at a mixed rate (so
    that the attention path is part of the comparison, not silenced)."""
    ours.eval()
    sj.eval()
    sj_functional.reset_net(sj)
    rates: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: rates.__setitem__(n, out.mean().item()))
        for n, m in ours.named_modules()
        if n.endswith("attn.attn_lif")
    ]
    with torch.no_grad():
        got = ours(x)
        expected = sj(x)
    for h in hooks:
        h.remove()
    assert len(rates) == len(ours.blocks) and all(0 < r < 1 for r in rates.values()), rates
    expected = expected.mean(0) if expected.dim() == 3 else expected  # sj's Spikformer: per-step logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    _mixed(got)
    return got


def test_parity_spikingjelly_spikformer():
    torch.manual_seed(0)
    sj = sj_spikformer.Spikformer(
        T=2, in_channels=3, img_size_h=16, img_size_w=16, patch_size=4, num_classes=5, embed_dims=32,
        num_heads=4, depths=2,
    ).double()  # fmt: skip
    # spikingjelly max-pools the SPS conv output before the LIF; the reference code (and ours) pools the
    # spikes after it. Move sj's pools behind its neurons; everything else is compared as it is.
    for stage in sj.patch_embed.stages:
        block = stage.conv_bn.block
        if len(block) == 3:
            pool = sj_layer.SeqToANNContainer(block[2])
            stage.conv_bn.block = sj_layer.SeqToANNContainer(block[0], block[1])
            stage.forward = lambda x, s=stage, p=pool: p(s.neuron(s.conv_bn(x)))
    _excite(sj, seed=1, shift=1.5)
    for block in sj.blocks:  # 0.125 leaves the attention LIF silent at this size; exercise it
        block.attn.scale = 0.5
    ours = Spikformer(
        img_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5, T=2, attn_scale=0.5, backend="torch"
    ).double()
    _load_converted(ours, sj, "spikformer")
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    _compare_eval(ours, sj, x)
    # Full size: the same weights up to conv biases (ours: the reference code's proj / MLP biases).
    assert _weight_count(create_model("spikformer_4_384")) == _weight_count(
        sj_spikformer.spikformer_cifar10()
    )


def test_parity_spikingjelly_sdt():
    torch.manual_seed(0)
    sj = sj_sdt.SpikeDrivenTransformer(
        T=2, in_channels=3, num_classes=5, embed_dims=32, num_heads=4, depths=2, pooling_stat="0011"
    ).double()
    _excite(sj, seed=2, shift=1.5)
    # spikingjelly's stem convs have biases the reference code does not: the converter folds them into
    # the BN statistics, so they stay random here.
    assert all(sj.patch_embed.stages[i][0].bias.abs().sum() > 0 for i in range(3))
    ours = SpikeDrivenTransformer(
        img_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5, T=2, backend="torch"
    ).double()
    _load_converted(ours, sj, "sdt")
    _compare_eval(ours, sj, torch.rand(2, 3, 16, 16, dtype=torch.float64))
    full_sj = sj_sdt.SpikeDrivenTransformer(
        num_classes=10, embed_dims=512, num_heads=8, depths=2, pooling_stat="0011"
    )
    assert _weight_count(create_model("sdt_2_512")) == _weight_count(full_sj)


def test_parity_spikingjelly_qkformer():
    torch.manual_seed(0)
    heads = (2, 4, 4)
    sj = sj_qkformer.QKFormer(
        T=2, in_channels=3, num_classes=5, embed_dims=64, num_heads=heads, depths=(1, 1, 1)
    ).double()
    # The stem's conv biases stay random (the converter folds them into the BNs); with them, a shift of
    # 1.0 keeps the last stage's attention LIF firing at this size.
    _excite(sj, seed=3, shift=1.0)
    # spikingjelly's QKFormer is the ImageNet one (stem "imagenet"; pool on the first PEDS conv).
    ours = QKFormer(
        img_size=32, embed_dims=(16, 32, 64), depths=(1, 1, 1), num_heads=heads, stem="imagenet",
        num_classes=5, T=2, backend="torch",
    ).double()  # fmt: skip
    _load_converted(ours, sj, "qkformer")
    _compare_eval(ours, sj, torch.rand(2, 3, 32, 32, dtype=torch.float64))
    full_sj = sj_qkformer.QKFormer(num_classes=1000, embed_dims=768, num_heads=(12, 12, 12), depths=(1, 2, 7))
    assert _weight_count(create_model("qkformer_hst_10_768")) == _weight_count(full_sj)


# ---------------------------------------------------------------------------------------------------------
# Stateful segments (TDFormer): 2 + 2 steps with the membranes carried equal one 4-step run.

SEGMENT_MODELS = ["spikformer_4_384", "sdt_2_512", "qkformer_hst_4_384"]


def _features_and_grads(model: nn.Module, x: torch.Tensor, w: torch.Tensor, segments: int, carry: bool):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    reset(model)
    outs = []
    for chunk in x.chunk(segments):
        if not carry:
            reset(model)
        outs.append(model.forward_features(chunk))
    feats = torch.cat(outs)
    (feats * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return feats.detach(), x.grad, grads


@pytest.mark.parametrize("name", SEGMENT_MODELS)
def test_stateful_segments_equal_full_run(name):
    torch.manual_seed(0)
    overrides, shape = TINY[name]
    # Eval mode: BN then uses running statistics, the same for a 2-step and a 4-step call.
    model = _excite(create_model(name, backend="torch", stateful=True, **overrides), seed=4).double().eval()
    x = torch.rand(4, *shape[-4:], dtype=torch.float64)
    feats = model.forward_features(x)
    w = torch.randn_like(feats)
    full, gx_full, g_full = _features_and_grads(model, x, w, segments=1, carry=True)
    seg, gx_seg, g_seg = _features_and_grads(model, x, w, segments=2, carry=True)
    _mixed(full)
    torch.testing.assert_close(seg, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_seg, gx_full, rtol=1e-9, atol=1e-12)
    assert g_seg.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_seg[n], g_full[n], rtol=1e-9, atol=1e-12, msg=n)
    # The carried state matters: restarting every segment from rest gives other features.
    fresh, _, _ = _features_and_grads(model, x, w, segments=2, carry=False)
    assert not torch.equal(fresh, full)
    reset(model)


# ---------------------------------------------------------------------------------------------------------
# Feedback extras.


def _tiny_tokens(name: str, seed: int = 0):
    torch.manual_seed(seed)
    overrides, shape = TINY[name]
    model = _excite(create_model(name, backend="torch", **overrides), seed=seed).eval()
    x = torch.rand(shape)
    seq = x if x.dim() == 5 else torch.stack([x] * model.T)
    return model, seq


@pytest.mark.parametrize("name", SEGMENT_MODELS)
def test_extras_change_the_block_output(name):
    model, seq = _tiny_tokens(name)
    i = model.default_feedback_blocks[-1]
    block = model.blocks[i]
    with torch.no_grad():
        tokens = model.forward_blocks(model.forward_stem(seq))
        x = tokens.clone()  # a token tensor of the last block's shape [T, B, D, N]
        base = block(x)
        e = 2.0 * torch.randn_like(x)
        _mixed(base)
        assert not torch.equal(block(x, k_extra=e), base)
        with_x = block(x, x_extra=e)
        assert not torch.equal(with_x, base)
        # x_extra enters the attention input only, not the residual.
        y = x + block.attn(x + e)
        torch.testing.assert_close(with_x, y + block.mlp(y), rtol=0, atol=0)
        # Through forward_features, extras[i] reaches block i.
        feats = model.forward_features(seq)
        assert not torch.equal(model.forward_features(seq, {i: {"k_extra": e}}), feats)
        assert torch.equal(model.forward_features(seq, {}), feats)


def test_unknown_or_unsupported_extras_raise():
    model, seq = _tiny_tokens("qkformer_hst_4_384")
    first = model.blocks[0]  # Q-K token attention: no V branch
    x = torch.zeros(seq.shape[0], seq.shape[1], model.block_dims[0], model.block_tokens[0])
    with pytest.raises(ValueError, match="v_extra"):
        first(x, v_extra=torch.ones_like(x))
    with pytest.raises(ValueError, match="unknown extra"):
        model.forward_features(seq, {0: {"z_extra": x}})
    with pytest.raises(ValueError, match="block index"):
        model.forward_features(seq, {len(model.blocks): {"k_extra": x}})
    with pytest.raises(ValueError, match="x_extra"):
        first(x, x_extra=torch.ones(1, 2, 3))
    # A v_extra is fine where the attention has a V projection (SSA in stage 3).
    last = model.default_feedback_blocks[-1]
    shape = (seq.shape[0], seq.shape[1], model.block_dims[last], model.block_tokens[last])
    model.forward_features(seq, {last: {"v_extra": torch.ones(shape)}})


def test_forward_blocks_slices_compose_to_the_whole():
    """A slice ends at the input of block ``stop`` (stage transition included): the two halves around
    the stem output or any block of the last stage give the full features."""
    model, seq = _tiny_tokens("qkformer_hst_4_384")
    with torch.no_grad():
        stem = model.forward_stem(seq)
        full = model.forward_blocks(stem)
        _mixed(full)
        for k in [0, *model.default_feedback_blocks, len(model.blocks)]:
            head = model.forward_blocks(stem, stop=k)
            spatial = head.reshape(*head.shape[:3], *stem.shape[3:]) if k == 0 else head
            assert torch.equal(model.forward_blocks(spatial, start=k), full)
        stage3 = model.block_stage.index(2)
        assert model.forward_blocks(stem, stop=stage3).shape[-1] == model.block_tokens[stage3]
    with pytest.raises(ValueError, match="spatial"):  # tokens cannot cross a patch embedding
        model.forward_blocks(model.forward_blocks(stem, stop=0).flatten(3), start=0)
    with pytest.raises(ValueError, match="start"):
        model.forward_blocks(stem, start=3, stop=1)


def test_feedback_extra_reaches_fb_lidiff_blocks_only():
    torch.manual_seed(0)
    overrides, shape = TINY["qkformer_hst_4_384"]
    model = _excite(
        create_model(
            "qkformer_hst_4_384", backend="torch", attn=("ff_lidiff", "ff_lidiff", "fb_lidiff"), **overrides
        )
    ).eval()
    seq = torch.stack([torch.rand(shape)] * model.T)
    last = len(model.blocks) - 1
    assert [b.accepts_feedback for b in model.blocks] == [False, False, True, True]
    with torch.no_grad():
        x = model.forward_blocks(model.forward_stem(seq), stop=last)
        f = (torch.rand_like(x) < 0.5).float()
        block = model.blocks[last]
        # The block hands feedback to FB-LiDiff: the same as calling the attention with it directly.
        y = x + block.attn(x, feedback=f)
        torch.testing.assert_close(block(x, feedback=f), y + block.mlp(y), rtol=0, atol=0)
        assert not torch.equal(block(x, feedback=f), block(x))
        feats = model.forward_blocks(x, {last: {"feedback": f}}, start=last)
        torch.testing.assert_close(feats, block(x, feedback=f), rtol=0, atol=0)
    first = model.blocks[0]
    x0 = torch.zeros(seq.shape[0], seq.shape[1], model.block_dims[0], model.block_tokens[0])
    with pytest.raises(ValueError, match="no feedback"):
        first(x0, feedback=x0)
