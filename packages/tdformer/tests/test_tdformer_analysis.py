"""The analysis estimators against scikit-learn's plug-in mutual information (an independent reference)."""

import math

import pytest
import torch
from sklearn.metrics import mutual_info_score
from tdformer_testing import lively

from tdformer.analysis import binary_mi_bits, discrete_mi_bits


def _miller_madow_bits(a, b) -> float:
    """sklearn's plug-in MI plus the Miller-Madow terms (bins used - 1) / 2n of H(a) + H(b) - H(a, b)."""
    n = len(a)
    used = lambda v: len(set(v))  # noqa: E731
    joint = list(zip(a, b, strict=True))
    corr = ((used(a) - 1) + (used(b) - 1) - (used(joint) - 1)) / (2 * n)
    return max(mutual_info_score(a, b) + corr, 0.0) / math.log(2)


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_discrete_mi_matches_sklearn(levels):
    g = torch.Generator().manual_seed(levels)
    n, units = 400, 6
    a = torch.randint(0, levels, (n, units), generator=g)
    noise = torch.randint(0, levels, (n, units), generator=g)
    keep = torch.rand(n, units, generator=g) < torch.linspace(0, 1, units)  # from independent to identical
    b = torch.where(keep, a, noise)
    ours = discrete_mi_bits(a, b, levels)
    ref = sum(_miller_madow_bits(a[:, u].tolist(), b[:, u].tolist()) for u in range(units)) / units
    assert ours == pytest.approx(ref, abs=1e-9)


def test_binary_mi_limits():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20000, 3, generator=g) < 0.5
    assert binary_mi_bits(a, a) == pytest.approx(1.0, abs=1e-3)  # identical fair coins: 1 bit
    b = torch.rand(20000, 3, generator=g) < 0.5
    assert binary_mi_bits(a, b) == pytest.approx(0.0, abs=2e-3)  # independent: ~0


def test_energy_of_the_feedback_is_its_control_and_processing_modules():
    """``analyze``'s energy entry, on the same weights with feedback on and off, against the closed form of
    what feedback adds: per sample and step of the segments it runs in, one D x D projection (CM1) per
    feedback block on N tokens, and the PM's token mixer and depthwise channel mixer (D MACs per token
    each)."""
    from spikecore.energy import estimate
    from tdformer.registry import create_model

    T, segments, B, D = 4, 2, 2, 32
    torch.manual_seed(0)
    net = create_model("tdformer_spikformer_4_384", img_size=16, embed_dim=D, depth=2, num_heads=4, T=T)
    assert net.segments == segments and net.feedback
    x = torch.rand(B, 3, 16, 16)
    on = estimate(net, x, samples=B)
    net.feedback = False
    off = estimate(net, x, samples=B)
    N = net.backbone.block_tokens[-1]
    steps = T // segments * (segments - 1)  # CM: in segments 2..N; PM: on the outputs of segments 1..N-1
    cm = len(net.feedback_blocks) * D * D * N * steps * B
    pm = 2 * D * N * steps * B
    assert on.dense_macs - off.dense_macs == cm + pm
    assert on.params == off.params  # the same weights
    added = {r.layer for r in on.layers} - {r.layer for r in off.layers}
    assert added == {f"control.{i}.proj" for i in net.feedback_blocks} | {"pm", "pm.channel_conv"}
    assert on.to_dict()["per_sample"]["dense_macs"] == on.dense_macs / B


def test_mi_matrix_against_sklearn_symmetric_with_entropies_on_the_diagonal():
    """Fig. 1's T x T matrix: every entry the per-unit Miller-Madow MI of scikit-learn's plug-in estimate,
    symmetric, and the diagonal each step's entropy (MI(X, X) = H(X)) computed from the firing rate."""
    from tdformer.analysis import mi_matrix_bits

    g = torch.Generator().manual_seed(7)
    T, n, units = 4, 300, 5
    steps = [torch.rand(n, units, generator=g) < 0.4]
    for _ in range(1, T):  # each step keeps 70% of the previous one: MI falls with the distance in time
        keep = torch.rand(n, units, generator=g) < 0.7
        steps.append(torch.where(keep, steps[-1], torch.rand(n, units, generator=g) < 0.4))
    spikes = torch.stack(steps)
    m = mi_matrix_bits(spikes)
    assert len(m) == T and all(len(row) == T for row in m)
    for t1 in range(T):
        for t2 in range(T):
            cols = [(spikes[t1][:, u].tolist(), spikes[t2][:, u].tolist()) for u in range(units)]
            ref = sum(_miller_madow_bits(a, b) for a, b in cols) / units
            assert m[t1][t2] == pytest.approx(ref, abs=1e-9)
            assert m[t1][t2] == m[t2][t1]
        p = spikes[t1].double().mean(0)
        plug_in = -(p * p.log() + (1 - p) * (1 - p).log())  # nats; both outcomes occur in every unit
        entropy = ((plug_in + 1 / (2 * n)) / math.log(2)).mean()  # Miller-Madow: (2 bins - 1) / 2n
        assert m[t1][t1] == pytest.approx(float(entropy), abs=1e-9)
    assert m[0][1] > m[0][2] > m[0][3]


@pytest.mark.parametrize("loss", ["last", "segments", "all"])
def test_a_baseline_is_scored_with_the_feedback_models_loss(loss):
    """With its feedback off, a TDFormer carrying the membrane across segments computes exactly its
    backbone's T-step run; scored by ``measure`` with the same loss, the plain backbone with the same
    weights must give the same gradients along time and the same MI (it used to be scored through the
    head over all T steps whatever the feedback model's loss was)."""
    import torch.nn.functional as F

    from tdformer.analysis import measure, scoring_loss, segment_features
    from tdformer.registry import create_model

    torch.manual_seed(0)
    kw = dict(T=4, backend="torch", img_size=16, embed_dim=16, depth=1, num_heads=2)
    td = create_model("tdformer_spikformer_4_384", segments=2, **kw).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    lively(td, x, scale=2.0).feedback = False
    base = create_model("spikformer_4_384", **kw).double().eval()
    base.load_state_dict(td.backbone.state_dict())
    cpu = torch.device("cpu")
    a = measure(td, [(x, y)], cpu, loss=loss, epsilon="off")
    b = measure(base, [(x, y)], cpu, segments=2, loss=loss, epsilon="off")
    assert all(g > 0 for g in b["grad_norm_per_step"])  # every step gets gradient: not vacuous
    assert a["grad_norm_per_step"] == pytest.approx(b["grad_norm_per_step"], rel=1e-10)
    for row_a, row_b in zip(a["mi_matrix_bits"], b["mi_matrix_bits"], strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-12)
    # the loss itself, independently: mean over tokens and over the steps it covers, then the head
    feats, head = segment_features(base, x, 2)
    full = base.forward_features(base.to_sequence(x))
    ce = [F.cross_entropy(base.head(full[i:j].mean(-1).mean(0)), y) for i, j in ((0, 2), (2, 4), (0, 4))]
    want = {"last": ce[1], "segments": ce[0] / 3 + 2 * ce[1] / 3, "all": ce[2]}[loss]
    got = scoring_loss(head, feats, y, loss, [1 / 3, 2 / 3])
    assert float(got) == pytest.approx(float(want), rel=1e-6)  # the logits go through float32
