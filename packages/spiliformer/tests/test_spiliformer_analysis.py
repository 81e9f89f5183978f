"""The analysis estimators against hand-computed values."""

import math

import torch

from spiliformer.analysis import LayerStats, auto_foreground, token_grid, token_mass, token_weights


def test_foreground_share_chance_and_entropy_by_hand():
    # One step, one sample, one head, 4 tokens; tokens 0 and 1 are foreground.
    mass = torch.tensor([3.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    s = LayerStats()
    s.add(mass, w)
    r = s.result()
    assert r["fg_share"] == 1.0 and r["chance"] == 0.5
    assert r["mass_per_fg_token"] == 2.0 and r["mass_per_bg_token"] == 0.0
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(r["entropy"], h / math.log(4), rel_tol=1e-12)
    uniform = LayerStats()
    uniform.add(torch.ones(1, 1, 1, 4), w)
    assert uniform.result()["fg_share"] == 0.5 and math.isclose(uniform.result()["entropy"], 1.0)


def test_token_weights_pool_the_mask_to_the_grid():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # the top-left quarter
    assert token_grid(4, 4, 4) == (2, 2)
    assert torch.equal(token_weights(mask, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(token_weights(mask, 1), torch.tensor([[0.25]]))


def test_auto_foreground_and_ssa_mass():
    img = torch.zeros(1, 3, 2, 2)
    img[0, :, 0, 0] = 1.0
    assert torch.equal(auto_foreground(img), torch.tensor([[[True, False], [False, False]]]))
    events = torch.zeros(2, 1, 2, 2, 2)
    events[1, 0, 1, 1, 0] = 1
    assert torch.equal(auto_foreground(events), torch.tensor([[[False, False], [True, False]]]))
    from spikecore.attention import SpikingSelfAttention

    attn = SpikingSelfAttention(4, 1)
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 4, 2)  # [T,B,C,N]
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 4, 2)
    # Key j receives sum_i Q_i . K_j: Q_0 = (1,1,0,0), Q_1 = (0,1,0,0); K_0 = (1,0,..), K_1 = (1,1,..)
    # -> key 0: 1 + 0 = 1; key 1: 2 + 1 = 3.
    assert torch.equal(token_mass(attn, q, k, q).flatten(), torch.tensor([1.0, 3.0]))


def test_energy_of_lateral_inhibition_is_the_second_pass_and_the_feedback_path():
    """``analyze``'s energy entry, SpiLiFormer against the same weights with lateral inhibition off, against
    the closed form of what SpiLiFormer adds per sample: at every step, pass 2 over each FB block of the last
    stage (Q, K, V, output and MLP projections 12 D^2 N, the linear-order SSA products 2 N D d), the
    feedback's V projection and its decoder (D^2 N each), the prompt masks (2 D N); and a second head."""
    from spikecore.energy import estimate
    from spiliformer.model import lateral_inhibition_off
    from spiliformer.registry import create_model

    T, B, D, heads, classes = 2, 2, 32, 4, 10
    torch.manual_seed(0)
    net = create_model(
        "spiliformer_4_384", embed_dims=(8, 16, D), depths=(1, 1, 1), num_heads=heads, img_size=16, T=T
    )
    x = torch.rand(B, 3, 16, 16)
    on = estimate(net, x, samples=B)
    off = estimate(lateral_inhibition_off(net), x, samples=B)
    N, fb = net.backbone.block_tokens[-1], len(net.feedback_blocks)
    per_step = fb * (12 * D * D * N + 2 * N * D * (D // heads) + 2 * D * D * N) + 2 * D * N
    assert on.dense_macs - off.dense_macs == B * (T * per_step + D * classes)
    assert on.params - off.params == sum(p.numel() for p in net.generator.parameters())
    ours = {r.layer.removeprefix("backbone.") for r in on.layers}  # the baseline is the backbone itself
    assert ours - {r.layer for r in off.layers} == {
        "generator",
        *(f"generator.decoders.{k}.linear" for k in range(fb)),
    }
