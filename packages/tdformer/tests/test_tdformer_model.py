"""TDFormer's model: registry, parameter counts, and that the feedback really does what the paper says."""

import pytest
import torch
from tdformer_testing import lively

import spikecore
import tdformer
from spikecore.models import TimeMajorDropPath
from tdformer import TDFormer, create_model, list_models

# Tiny versions of each family (every constructor argument the real ones have, small values).
TINY = {
    "spikformer_4_384": dict(img_size=16, embed_dim=32, depth=2, num_heads=4),
    "spikformer_2_256_dvs": dict(img_size=32, embed_dim=32, depth=1, num_heads=4),
    "sdt_2_256": dict(img_size=32, embed_dim=32, depth=1, num_heads=4),
    "sdt_2_512": dict(img_size=16, embed_dim=32, depth=2, num_heads=4),
    "qkformer_hst_4_384": dict(img_size=16, embed_dims=(8, 16, 32), depths=(1, 1, 2), num_heads=4),
    "qkformer_hst_2_256": dict(img_size=32, embed_dims=(16, 32), depths=(1, 1), num_heads=4),
    "qkformer_hst_10_768": dict(img_size=32, embed_dims=(8, 16, 32), depths=(1, 1, 2), num_heads=4),
}
DVS = {"spikformer_2_256_dvs", "sdt_2_256", "qkformer_hst_2_256"}

# Published parameter counts (millions): the paper's tables.
PUBLISHED = {
    "spikformer_4_384": 9.32,
    "tdformer_spikformer_4_384": 9.92,
    "sdt_2_256": 2.57,
    "tdformer_sdt_2_256": 2.69,
    "qkformer_hst_4_384": 6.74,
    "qkformer_hst_10_768": 64.96,
    "tdformer_qkformer_hst_10_768": 69.09,
}


def n_params(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def tiny(name: str, **kw) -> torch.nn.Module:
    base = name.removeprefix("tdformer_")
    return create_model(name, T=4, backend="torch", **TINY[base], **kw)


def sample(name: str, batch: int = 2) -> torch.Tensor:
    base = name.removeprefix("tdformer_")
    size = TINY[base]["img_size"]
    if base in DVS:
        return torch.rand(4, batch, 2, size, size)
    return torch.rand(batch, 3, size, size)


def test_registry_lists_every_backbone_and_its_feedback_version():
    names = list_models()
    for base in TINY:
        assert base in names and "tdformer_" + base in names
    with pytest.raises(ValueError, match="Did you mean"):
        create_model("tdformer_spikformer_4_348")
    with pytest.raises(ValueError, match="TDFormer option"):
        create_model("spikformer_4_384", segments=2)


def test_tdformers_models_are_in_spikecores_one_registry():
    """One registry: spikecore builds tdformer's models by name, tdformer's view lists the same names
    with the same (shell-glob) matching, and a fresh process needs no ``import tdformer`` (entry point)."""
    from spikecore.models import create_model as spikecore_create
    from spikecore.models import list_models as spikecore_list

    assert list_models("tdformer_*") == spikecore_list("tdformer_*") == sorted("tdformer_" + b for b in TINY)
    assert list_models("*sdt*") == ["sdt_2_256", "sdt_2_512", "tdformer_sdt_2_256", "tdformer_sdt_2_512"]
    assert list_models("sdt") == []  # a pattern, not a substring
    a = spikecore_create("tdformer_spikformer_4_384", T=4, backend="torch", **TINY["spikformer_4_384"])
    assert isinstance(a, TDFormer) and a.segments == 2 and a.backbone.make_lif().backend == "torch"
    code = (
        "import sys; from spikecore.models import create_model, list_models\n"
        "m = create_model('tdformer_spikformer_4_384', img_size=16, embed_dim=32, depth=1, num_heads=4)\n"
        "print(type(m).__module__, 'tdformer_sdt_2_512' in list_models())"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tdformer.model", "True"]


def test_arch_names_the_model_and_an_old_backbone_arch_still_builds_it():
    """``arch`` is the registered model (``tdformer_...``); ``feedback: false`` builds the backbone it is
    built on. A backbone name (tdformer's ``arch`` before) is read as the model, with a FutureWarning."""
    from tdformer import TDFormerClassifier

    kw = dict(T=4, arch_kwargs=dict(TINY["spikformer_4_384"], backend="torch"))
    torch.manual_seed(0)
    new = TDFormerClassifier(arch="tdformer_spikformer_4_384", **kw)
    with pytest.warns(FutureWarning, match="read as arch: tdformer_spikformer_4_384"):
        old = TDFormerClassifier(arch="spikformer_4_384", **kw)
    assert old.hparams.arch == "tdformer_spikformer_4_384"  # what its checkpoints will say
    assert old.net.state_dict().keys() == new.net.state_dict().keys() and isinstance(old.net, TDFormer)
    base = TDFormerClassifier(arch="tdformer_spikformer_4_384", feedback=False, **kw)
    assert type(base.net).__name__ == "Spikformer"
    assert TDFormerClassifier.upgrade_hparams({"arch": "sdt_2_512", "T": 4}) == {
        "arch": "tdformer_sdt_2_512",
        "T": 4,
        "neuron": None,  # options newer than the checkpoint: what rebuilds the saved model
        "pm_neuron": None,
    }
    with pytest.raises(ValueError, match="arch names a TDFormer model"):
        TDFormerClassifier(arch="spiliformer_4_384", **kw)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_paper(name):
    assert n_params(create_model(name)) == pytest.approx(PUBLISHED[name], rel=0.01)


def test_feedback_adds_one_d_by_d_per_feedback_block():
    base, td = create_model("qkformer_hst_4_384"), create_model("tdformer_qkformer_hst_4_384")
    d, blocks = 384, td.feedback_blocks
    assert len(blocks) == 2  # the two stage-3 blocks
    pm = sum(p.numel() for p in td.pm.parameters())
    assert pm < 4 * d + 1  # token weights, depthwise conv, BN affine
    assert n_params(td) * 1e6 - n_params(base) * 1e6 == len(blocks) * d * d + pm


@pytest.mark.parametrize("name", [*TINY, *("tdformer_" + n for n in TINY)])
def test_every_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    x = sample(name)
    model = lively(tiny(name), x).train()
    out = model(x)
    assert out.shape == (2, 10 if "10_768" not in name else 1000) or out.shape[0] == 2
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3]) and any(g.abs().sum() > 0 for g in grads if g is not None)
    if name.startswith("tdformer_"):  # the feedback path is trained too
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.control.parameters())


def _copy_backbone(td: TDFormer, name: str) -> torch.nn.Module:
    plain = tiny(name)
    plain.load_state_dict(td.backbone.state_dict())
    return plain


@pytest.mark.parametrize("name", ["spikformer_4_384", "sdt_2_256", "qkformer_hst_4_384"])
@pytest.mark.parametrize("train", [False, True])
def test_one_segment_tdformer_equals_its_backbone(name, train):
    torch.manual_seed(0)
    td = tiny("tdformer_" + name, segments=1)
    plain = _copy_backbone(td, name)
    td.train(train)
    plain.train(train)
    x = sample(name)
    torch.testing.assert_close(td(x), plain(x), rtol=0, atol=0)


def test_segments_carry_the_membrane_like_one_run():
    """No feedback, eval mode: the N segments' features are the backbone's features over all T steps."""
    torch.manual_seed(0)
    x = sample("spikformer_4_384")
    td = lively(tiny("tdformer_spikformer_4_384", segments=2, feedback=False), x)
    plain = _copy_backbone(td, "spikformer_4_384").eval()
    _, feats = td.forward_segments(x, return_features=True)
    with torch.no_grad():
        full = plain.forward_features(plain.to_sequence(x))
    torch.testing.assert_close(torch.cat(feats), full, rtol=0, atol=0)
    assert full.sum() > 0


def test_stochastic_depth_draws_once_for_all_segments():
    """Training-mode stochastic depth (eval-mode BN, no feedback): the 2 segments equal one run of the
    backbone over all T steps with the same draws, i.e. a sample's branch is dropped in every segment
    alike, not drawn again per segment."""
    torch.manual_seed(0)
    x = sample("spikformer_4_384", batch=8)
    td = lively(tiny("tdformer_spikformer_4_384", segments=2, feedback=False, drop_path_rate=0.5), x)
    plain = tiny("spikformer_4_384", drop_path_rate=0.5)
    plain.load_state_dict(td.backbone.state_dict())
    plain.eval()
    paths = [m for net in (td, plain) for m in net.modules() if isinstance(m, TimeMajorDropPath)]
    assert len(paths) == 4  # block 1 of 2 in each: attention and MLP branches
    for m in paths:
        m.train()
    with torch.no_grad():
        torch.manual_seed(1)
        _, feats = td.forward_segments(x, return_features=True)
        torch.manual_seed(1)
        full = plain.forward_features(plain.to_sequence(x))
        undropped = plain.eval().forward_features(plain.to_sequence(x))
    torch.testing.assert_close(torch.cat(feats), full, rtol=0, atol=0)
    assert not torch.equal(full, undropped) and full.sum() > 0  # some branch was dropped
    assert all(m._mask is None for m in paths)  # the held masks are released after the forward pass


def _second_segment_output(model: TDFormer, seq: torch.Tensor) -> torch.Tensor:
    return model.forward_segments(seq)[1]


@pytest.mark.parametrize("control", ["cm1", "cm2", "cm3"])
def test_feedback_is_real(control):
    """Segment 2's output depends on segment 1's input through the feedback path alone: with the state
    reset between segments, it changes with feedback on and does not with feedback off."""
    torch.manual_seed(0)
    name = "sdt_2_256" if control == "cm2" else "spikformer_2_256_dvs"  # cm2 needs a V branch: SSA / SDSA
    seq = (torch.rand(4, 3, 2, 32, 32) < 0.3).float()
    td = lively(tiny("tdformer_" + name, segments=2, control=control, carry_state=False), seq)
    other = seq.clone()
    other[:2] = (torch.rand(2, 3, 2, 32, 32) < 0.3).float()  # a different first segment
    with torch.no_grad():
        td.feedback = True
        assert not torch.equal(_second_segment_output(td, seq), _second_segment_output(td, other))
        td.feedback = False
        torch.testing.assert_close(
            _second_segment_output(td, seq), _second_segment_output(td, other), rtol=0, atol=0
        )
        td.carry_state = True  # and the carried membrane is a second path from segment 1 to segment 2
        assert not torch.equal(_second_segment_output(td, seq), _second_segment_output(td, other))


def test_feedback_changes_only_later_segments():
    torch.manual_seed(0)
    x = sample("tdformer_spikformer_4_384")
    td = lively(tiny("tdformer_spikformer_4_384", segments=2), x)
    with torch.no_grad():
        on = td.forward_segments(x)
        td.feedback = False
        off = td.forward_segments(x)
    torch.testing.assert_close(on[0], off[0], rtol=0, atol=0)  # segment 1 never has feedback
    assert not torch.equal(on[1], off[1])


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="segments"):
        tiny("tdformer_spikformer_4_384", segments=3)(sample("spikformer_4_384"))
    with pytest.raises(ValueError, match="does not exist"):
        tiny("tdformer_spikformer_4_384", feedback_blocks=[7])
    with pytest.raises(ValueError, match="width"):
        tiny("tdformer_qkformer_hst_4_384", feedback_blocks=[0])
    with pytest.raises(ValueError, match="v_extra"):  # Q-K attention has no V for CM2
        tiny("tdformer_qkformer_hst_4_384", control="cm2", attn=("qkta", "qkta", "qkta"))(
            sample("qkformer_hst_4_384")
        )


def test_state_never_leaks_between_batches():
    torch.manual_seed(0)
    x = sample("spikformer_4_384")
    td = lively(tiny("tdformer_spikformer_4_384"), x)
    with torch.no_grad():
        first = td(x)
        td(torch.rand(3, 3, 16, 16))  # another batch, another size
        again = td(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.abs().sum() > 0
    assert tdformer.__version__
    assert all(m.stateful for m in td.modules() if isinstance(m, spikecore.LIF))


def test_pm_neurons_come_from_arguments_not_from_the_backbone():
    """A backbone with other neurons (tau 3, atan surrogate, reset kept in the graph) leaves the PM with the
    paper's defaults; the ``pm_*`` arguments, from the model or the training module's config, set it."""
    from tdformer import TDFormerClassifier

    backbone = dict(tau=3.0, surrogate="atan", alpha=1.0, detach_reset=False)
    net = tiny("tdformer_spikformer_4_384", **backbone)
    assert {
        (m.tau, m.surrogate, m.detach_reset) for m in net.backbone.modules() if isinstance(m, spikecore.LIF)
    } == {(3.0, "atan", False)}
    for lif in (net.pm.token_lif, net.pm.channel_lif):
        assert (lif.tau, lif.v_threshold, lif.v_reset, lif.detach_reset) == (2.0, 1.0, 0.0, True)
        assert (lif.surrogate, lif.alpha, lif.stateful) == ("sigmoid", None, True)
    pm = dict(
        pm_tau=1.5,
        pm_v_threshold=0.5,
        pm_v_reset=None,
        pm_detach_reset=False,
        pm_surrogate="rect",
        pm_alpha=0.5,
    )
    net = tiny("tdformer_spikformer_4_384", **pm)
    module = TDFormerClassifier(
        arch="tdformer_spikformer_4_384", T=4, arch_kwargs=dict(TINY["spikformer_4_384"]), **pm
    )
    for lif in (net.pm.token_lif, net.pm.channel_lif, module.net.pm.token_lif, module.net.pm.channel_lif):
        assert (lif.tau, lif.v_threshold, lif.v_reset, lif.detach_reset) == (1.5, 0.5, None, False)
        assert (lif.surrogate, lif.alpha) == ("rect", 0.5)
    assert module.hparams.pm_surrogate == "rect"  # saved with the checkpoint


def test_pm_neuron_is_one_value_read_like_the_keywords():
    """``pm_neuron`` (a NeuronConfig; a ``pm_neuron:`` YAML section for the training module) gives the PM
    the same neurons as the ``pm_*`` keywords; "auto" runs on the backbone's backend; both at once is an
    error naming them."""
    from tdformer import TDFormerClassifier

    pm = dict(pm_tau=1.5, pm_v_threshold=0.5, pm_v_reset=None, pm_surrogate="rect", pm_alpha=0.5)
    cfg = spikecore.BACKBONE_NEURON.replace(
        tau=1.5, v_threshold=0.5, v_reset=None, surrogate="rect", alpha=0.5
    )
    by_keywords = tiny("tdformer_spikformer_4_384", **pm)
    by_config = tiny("tdformer_spikformer_4_384", pm_neuron=cfg)
    assert by_config.pm.neuron == by_keywords.pm.neuron == cfg.replace(backend="torch")  # the backbone's
    assert tiny("tdformer_spikformer_4_384", pm_neuron=cfg.replace(backend="cpu")).pm.neuron.backend == "cpu"
    with pytest.raises(TypeError, match=r"pm_neuron= and pm_tau="):
        tiny("tdformer_spikformer_4_384", pm_neuron=cfg, pm_tau=2.0)
    kw = dict(
        arch="tdformer_spikformer_4_384", T=4, arch_kwargs=dict(TINY["spikformer_4_384"], backend="torch")
    )
    module = TDFormerClassifier(pm_neuron=cfg, **kw)
    assert module.net.pm.neuron == by_config.pm.neuron
    assert module.hparams.pm_neuron == cfg.to_dict()  # plain values in the checkpoint
    assert TDFormerClassifier(pm_neuron=cfg.to_dict(), **kw).net.pm.neuron == by_config.pm.neuron
    from spikecore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.pm_neuron and model.pm_tau both set"):
        TDFormerClassifier(pm_neuron=cfg, pm_tau=3.0, **kw)
