"""Stochastic depth on time-major tensors: a sample's residual branch is dropped at every time step alike.

The properties are checked from the outputs alone (each sample either all zero or all scaled by 1 / keep,
at every step), against timm's batch-first ``drop_path`` on the transposed tensor, and at the block and
model level with the branches recomputed independently.
"""

import pytest
import torch
from timm.layers import DropPath
from timm.layers import drop_path as timm_drop_path
from torch import nn

from spikecore.models import (
    SpikingBlock,
    TimeMajorDropPath,
    create_model,
    drop_path,
    hold_drop_path_masks,
    make_attention,
)
from spikecore.models.layers import MembraneShortcutMlp, SpikingMlp


def per_sample_decisions(x: torch.Tensor, y: torch.Tensor, keep: float) -> torch.Tensor | None:
    """For ``y = drop(x)`` on ``[T, B, ...]`` (``x`` nowhere zero): ``kept[b]`` if every sample is either
    ``x / keep`` at every step or 0 at every step; ``None`` if any sample mixes the two over its steps."""
    dropped = (y == 0).flatten(2).all(-1)  # [T, B]: the step's whole slice is zero
    scaled = torch.isclose(y, x / keep, rtol=1e-6, atol=0).flatten(2).all(-1)
    if not (dropped ^ scaled).all():
        raise AssertionError("an output slice is neither 0 nor x / keep")
    if not (dropped == dropped[:1]).all():
        return None
    return ~dropped[0]


def nonzero(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape)
    return x + x.sign() * 0.1  # no exact zeros, so that zero means dropped


# -- the function and the module ----------------------------------------------------------------------------
def test_each_sample_is_dropped_or_scaled_at_every_time_step():
    torch.manual_seed(0)
    x, p = nonzero(6, 16, 3, 5), 0.4
    y = drop_path(x, p, training=True)
    kept = per_sample_decisions(x, y, 1 - p)
    assert kept is not None
    assert 0 < int(kept.sum()) < 16  # this draw has both outcomes
    torch.testing.assert_close(y, x * kept.view(1, -1, 1, 1) / (1 - p))


def test_timm_drop_path_on_time_major_tensors_mixes_steps_of_a_sample():
    """The bug this module fixes, and proof that the check above can fail: timm's DropPath on [T, B, ...]
    draws per time step for the whole batch, so a sample is kept at some steps and dropped at others."""
    torch.manual_seed(0)
    x, p = nonzero(8, 4, 3), 0.5
    timm_module = DropPath(p).train()
    assert any(per_sample_decisions(x, timm_module(x), 1 - p) is None for _ in range(20))


@pytest.mark.parametrize("batch_dim", [0, 1, 2])
def test_equals_timm_drop_path_on_the_batch_first_view(batch_dim):
    x, p = nonzero(3, 4, 5, 6), 0.3
    torch.manual_seed(1)
    y = drop_path(x, p, training=True, batch_dim=batch_dim)
    torch.manual_seed(1)
    ref = timm_drop_path(x.movedim(batch_dim, 0), p, training=True).movedim(0, batch_dim)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert y.shape == x.shape


def test_drop_frequency_is_p_and_samples_are_independent():
    torch.manual_seed(2)
    draws, T, B, p = 400, 4, 32, 0.3
    module = TimeMajorDropPath(p).train()
    x = torch.ones(T, B, 2)
    kept = []
    for _ in range(draws):
        decisions = per_sample_decisions(x, module(x), 1 - p)
        assert decisions is not None  # every step of every sample agrees, every draw
        kept.append(decisions)
    dropped = ~torch.stack(kept)  # [draws, B]
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.02)  # 12800 Bernoulli: sd 0.004
    # Independent samples: the number dropped per draw is Binomial(B, p), variance B p (1 - p) = 6.7
    # (all-or-nothing per draw, as one mask per time step gives, would have B^2 p (1 - p) = 215).
    counts = dropped.sum(1).float()
    assert counts.mean().item() == pytest.approx(B * p, rel=0.05)
    assert counts.var().item() == pytest.approx(B * p * (1 - p), rel=0.3)
    # and pairs of samples are dropped together with probability p^2
    both = (dropped[:, :, None] & dropped[:, None, :]).float().mean(0)
    off_diagonal = both[~torch.eye(B, dtype=torch.bool)]
    assert off_diagonal.mean().item() == pytest.approx(p * p, abs=0.01)


def test_eval_mode_and_zero_probability_are_the_identity():
    x = torch.randn(4, 3, 5)
    assert TimeMajorDropPath(0.5).eval()(x) is x
    assert TimeMajorDropPath(0.0).train()(x) is x
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x


def test_drop_everything_and_no_scaling():
    x = nonzero(3, 5, 2)
    assert (drop_path(x, 1.0, training=True) == 0).all()
    torch.manual_seed(3)
    y = drop_path(x, 0.5, training=True, scale_by_keep=False)
    kept = per_sample_decisions(x, y, 1.0)
    assert kept is not None and 0 < int(kept.sum()) < 5


def test_gradient_is_the_same_per_sample_mask():
    torch.manual_seed(4)
    p = 0.5
    x = nonzero(5, 12, 3).requires_grad_()
    w = torch.randn(5, 12, 3)
    y = TimeMajorDropPath(p).train()(x)
    (y * w).sum().backward()
    kept = per_sample_decisions(x.detach(), y.detach(), 1 - p)
    assert kept is not None and 0 < int(kept.sum()) < 12
    torch.testing.assert_close(x.grad, w * kept.view(1, -1, 1) / (1 - p))


def test_invalid_probability_is_refused():
    with pytest.raises(ValueError, match="drop_prob"):
        TimeMajorDropPath(1.5)
    with pytest.raises(ValueError, match="drop_prob"):
        drop_path(torch.ones(2, 2), -0.1, training=True)


def test_held_masks_are_reused_within_the_block_and_fresh_outside():
    torch.manual_seed(5)
    p, B = 0.5, 16
    module = nn.Sequential(TimeMajorDropPath(p)).train()
    a, b = nonzero(2, B, 3), nonzero(3, B, 3)  # two segments of one sequence: T differs, B does not
    with hold_drop_path_masks(module):
        kept_a = per_sample_decisions(a, module(a), 1 - p)
        kept_b = per_sample_decisions(b, module(b), 1 - p)
        with hold_drop_path_masks(module):  # nested: the outer draw stays
            kept_c = per_sample_decisions(a, module(a), 1 - p)
        kept_d = per_sample_decisions(b, module(b), 1 - p)
        with pytest.raises(ValueError, match="does not fit"):
            module(nonzero(2, B + 1, 3))
    assert 0 < int(kept_a.sum()) < B
    assert torch.equal(kept_a, kept_b) and torch.equal(kept_a, kept_c) and torch.equal(kept_a, kept_d)
    assert module[0]._mask is None and not module[0]._hold
    outside = [per_sample_decisions(a, module(a), 1 - p) for _ in range(5)]
    assert any(not torch.equal(k, kept_a) for k in outside)  # 5 fresh draws of 16 samples


# -- the block ----------------------------------------------------------------------------------------------
def _fire(module: nn.Module, seed: int) -> nn.Module:
    """Eval-mode BatchNorms with positive shifts, so that the LIFs of a small random branch fire."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = 1 + 0.3 * torch.randn(m.num_features, generator=g)
            m.bias.data = 1.0 + 0.4 * torch.randn(m.num_features, generator=g)
    return module.eval()


@pytest.mark.parametrize("kind", ["ssa", "sdsa"])
def test_spiking_block_drops_each_samples_branches_at_every_step(kind):
    """x_out = x + d1 attn(x) + d2 mlp(x + d1 attn(x)) with d1, d2 in {0, 1/keep} per sample, the same at
    every step. The branches are recomputed outside the block (eval-mode BN: per-sample functions) and
    each sample must match exactly one of the four combinations over all its steps."""
    torch.manual_seed(6)
    T, B, D, N, p = 4, 8, 16, 9, 0.5
    neuron = {"backend": "torch"}
    mlp = SpikingMlp(D, 2 * D, neuron) if kind == "ssa" else MembraneShortcutMlp(D, 2 * D, neuron)
    block = SpikingBlock(make_attention(kind, D, 4, neuron), mlp, drop_path=p)
    assert isinstance(block.drop_path_attn, TimeMajorDropPath)
    assert isinstance(block.drop_path_mlp, TimeMajorDropPath)
    block.train()
    _fire(block.attn, 7), _fire(block.mlp, 8)  # branches in eval mode, stochastic depth in training
    x = (torch.rand(T, B, D, N) < 0.3).float()
    with torch.no_grad():
        attn = block.attn(x)
        s = 1 / (1 - p)
        mlp_of = {d1: block.mlp(x + d1 * attn) for d1 in (0.0, s)}
        combos = {(d1 > 0, d2 > 0): x + d1 * attn + d2 * mlp_of[d1] for d1 in (0.0, s) for d2 in (0.0, s)}
    for b in range(B):  # the four combinations are distinguishable for every sample
        assert attn[:, b].abs().sum() > 0 and mlp_of[0.0][:, b].abs().sum() > 0
        assert mlp_of[s][:, b].abs().sum() > 0
    seen = []
    for _ in range(30):
        with torch.no_grad():
            out = block(x)
        for b in range(B):
            match = [k for k, c in combos.items() if torch.allclose(out[:, b], c[:, b], atol=1e-5)]
            assert len(match) == 1, f"sample {b} matches {match}: not one per-sample decision over all steps"
            seen.append(match[0])
            if match[0] == (False, False):  # the residual contribution is 0 at every step
                assert torch.equal(out[:, b], x[:, b])
    attn_kept = sum(k[0] for k in seen) / len(seen)
    mlp_kept = sum(k[1] for k in seen) / len(seen)
    assert attn_kept == pytest.approx(1 - p, abs=0.1) and mlp_kept == pytest.approx(1 - p, abs=0.1)
    assert len(set(seen)) == 4  # the two branches are drawn independently


def test_spiking_block_in_eval_mode_has_no_stochastic_depth():
    torch.manual_seed(9)
    neuron = {"backend": "torch"}
    block = SpikingBlock(make_attention("ssa", 16, 4, neuron), SpikingMlp(16, 32, neuron), drop_path=0.9)
    _fire(block, 10)
    x = (torch.rand(3, 4, 16, 9) < 0.3).float()
    with torch.no_grad():
        torch.testing.assert_close(block(x), block(x), rtol=0, atol=0)
        plain = x + block.attn(x)
        torch.testing.assert_close(block(x), plain + block.mlp(plain), rtol=0, atol=0)


# -- every backbone -----------------------------------------------------------------------------------------
BACKBONES = {
    "spikformer_4_384": dict(img_size=16, embed_dim=32, depth=2, num_heads=4, T=3),
    "sdt_2_512": dict(img_size=16, embed_dim=32, depth=2, num_heads=4, T=3),
    "qkformer_hst_4_384": dict(img_size=16, embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=4, T=3),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_drops_per_sample_in_every_block(name):
    """Each block's drop-path input and output, seen through hooks during a training forward pass: the
    per-sample property holds at every block of Spikformer, SDT and QKFormer (spatial blocks included),
    and the rates rise linearly to drop_path_rate (timm's rule)."""
    torch.manual_seed(11)
    rate, T, B = 0.6, 3, 8
    model = create_model(name, backend="torch", drop_path_rate=rate, **BACKBONES[name]).train()
    n = len(model.blocks)
    assert not isinstance(model.blocks[0].drop_path_attn, TimeMajorDropPath)  # the first block's rate is 0
    probs = [blk.drop_path_attn.drop_prob for blk in model.blocks[1:]]
    assert probs == pytest.approx([rate * i / (n - 1) for i in range(1, n)])
    records = []

    def hook(module, args, out):
        assert args[0].shape[:2] == (T, B)  # [T, B, ...]: time-major
        records.append((args[0].detach(), out.detach(), 1 - module.drop_prob))

    for m in model.modules():
        if isinstance(m, TimeMajorDropPath):
            m.register_forward_hook(hook)
    model(torch.rand(B, 3, 16, 16)).sum().backward()
    assert len(records) == 2 * (n - 1)
    outcomes = set()
    for x, y, keep in records:
        live = x != 0  # spiking branches: only nonzero entries tell kept from dropped
        zeroed = ((y == 0) & live).transpose(0, 1).flatten(1).any(1)  # [B], over every step and entry
        scaled = (torch.isclose(y, x / keep, rtol=1e-6, atol=0) & live).transpose(0, 1).flatten(1).any(1)
        assert ((y == 0) | torch.isclose(y, x / keep, rtol=1e-6, atol=0)).all()
        assert not (zeroed & scaled).any(), "a sample kept at some entries or steps and dropped at others"
        outcomes.update(zeroed.tolist())
    assert outcomes == {True, False}
