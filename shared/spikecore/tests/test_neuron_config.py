"""``NeuronConfig``: the neuron's settings as one value, through lif_multi_step, LIF, the attention functions
and modules and every backbone, equal to the older keyword spelling, and never silently mixed with it."""

import dataclasses
import pickle

import pytest
import torch

import spikecore
from spikecore import BACKBONE_NEURON, LIF, NeuronConfig, lif_multi_step
from spikecore.attention import functional as AF
from spikecore.attention import modules as AM
from spikecore.models import create_model
from spikecore.neuron.config import ATTENTION_NEURON, NEURON_FIELDS, UNSET

# Settings that move every field away from its default (a soft reset, no input decay, atan with alpha 2...).
SETTINGS = [
    dict(),
    dict(tau=3.0, v_threshold=0.8, v_reset=None, detach_reset=True, surrogate="atan", alpha=2.0),
    dict(tau=1.5, v_threshold=1.2, v_reset=-0.2, decay_input=False, surrogate="rect", alpha=0.5),
]
CPU_BACKENDS = ("cpu", "torch")  # every backend that runs on the CPU (triton needs CUDA)

FAMILIES = {  # tiny backbones of each family
    "spikformer_4_384": dict(img_size=16, embed_dim=32, depth=1, num_heads=4, T=2),
    "sdt_2_512": dict(img_size=16, embed_dim=32, depth=1, num_heads=4, T=2),
    "qkformer_hst_4_384": dict(img_size=16, embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=4, T=2),
}


def _run(x: torch.Tensor, v0: torch.Tensor, **kwargs):
    x = x.clone().requires_grad_(True)
    v0 = v0.clone().requires_grad_(True)
    s, v = lif_multi_step(x, v0, **kwargs)
    (s * torch.linspace(-1, 1, s.numel()).reshape(s.shape)).sum().backward(retain_graph=True)
    (v**2).sum().backward()
    return s.detach(), v.detach(), x.grad, v0.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "soft-atan", "no-decay-rect"])
def test_lif_multi_step_neuron_equals_the_keyword_spelling(backend, settings):
    """Forward (spikes, v_final) and backward (x and v_init gradients) are identical, bit for bit."""
    torch.manual_seed(0)
    x, v0 = torch.randn(6, 4, 33) * 1.5, torch.randn(4, 33) * 0.3
    with_config = _run(x, v0, neuron=NeuronConfig(**settings, backend=backend))
    with_keywords = _run(x, v0, **settings, backend=backend)
    assert with_config[0].sum() > 0  # some spikes: the comparison is worth something
    for a, b in zip(with_config, with_keywords, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The default config is the default call: NeuronConfig's defaults are lif_multi_step's.
    if not settings:
        for a, b in zip(_run(x, v0, backend=backend), with_config, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("settings", SETTINGS[1:], ids=["soft-atan", "no-decay-rect"])
def test_lif_module_neuron_equals_the_keyword_spelling(settings):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 8) * 1.5
    a = LIF(neuron=NeuronConfig(**settings, backend="torch"), stateful=True)
    b = LIF(**settings, backend="torch", stateful=True)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)  # the carried state too
    assert a.neuron == b.neuron == NeuronConfig(**settings, backend="torch")
    assert LIF(neuron=a.neuron).extra_repr() == LIF(**settings, backend="torch").extra_repr()


def test_giving_both_spellings_is_an_error_naming_the_conflict():
    cfg = NeuronConfig(tau=3.0)
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"neuron= and the neuron keyword\(s\) tau=, v_reset="):
        lif_multi_step(x, neuron=cfg, tau=2.0, v_reset=None)
    with pytest.raises(TypeError, match=r"LIF\(\) got neuron= and .* backend="):
        LIF(neuron=cfg, backend="torch")
    with pytest.raises(TypeError, match=r"ssa\(\) got neuron= and .* v_threshold="):
        AF.ssa(*(torch.ones(2, 1, 4, 3),) * 3, heads=1, neuron=ATTENTION_NEURON, v_threshold=0.4)
    with pytest.raises(TypeError, match=r"SpikingSelfAttention\(\) got neuron= and .* tau="):
        AM.SpikingSelfAttention(8, 2, neuron=cfg, tau=2.0)
    with pytest.raises(TypeError, match=r"Spikformer\(\) got neuron= and .* surrogate="):
        create_model("spikformer_4_384", neuron=cfg, surrogate="atan", **FAMILIES["spikformer_4_384"])
    # A per-neuron tensor tau goes as the keyword, not inside a NeuronConfig (one float).
    with pytest.raises(TypeError, match=r"keyword\(s\) tau=:"):
        lif_multi_step(x, neuron=cfg, tau=torch.full((4,), 2.0))
    with pytest.raises(TypeError, match="per-neuron tensor tau"):
        NeuronConfig(tau=torch.tensor(2.0))


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        (dict(tau=0.0), ValueError, "tau must be positive"),
        (dict(tau=float("nan")), ValueError, "tau must be positive"),
        (dict(surrogate="sigmod"), ValueError, "unknown surrogate"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(backend="cuda"), ValueError, "unknown backend"),
        (dict(detach_reset="yes"), TypeError, "detach_reset must be True or False"),
        (dict(v_threshold="1"), TypeError, "v_threshold must be a number"),
    ],
)
def test_a_bad_setting_fails_when_the_config_is_made(settings, error, match):
    with pytest.raises(error, match=match):
        NeuronConfig(**settings)


def test_config_is_a_plain_frozen_value():
    cfg = NeuronConfig(tau=3, v_threshold=1, alpha=2)  # YAML integers are stored as floats
    assert (cfg.tau, cfg.v_threshold, cfg.alpha) == (3.0, 1.0, 2.0) and isinstance(cfg.tau, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau = 2.0
    assert cfg.replace(tau=4.0).tau == 4.0 and cfg.tau == 3.0
    assert NeuronConfig.coerce(cfg.to_dict()) == cfg and hash(cfg) == hash(NeuronConfig(**cfg.to_dict()))
    assert tuple(cfg.to_dict()) == NEURON_FIELDS
    assert pickle.loads(pickle.dumps(cfg)) == cfg and pickle.loads(pickle.dumps(UNSET)) is UNSET
    with pytest.raises(TypeError, match=r"unknown neuron setting.*'tauu'.*a NeuronConfig has tau"):
        NeuronConfig.coerce({"tauu": 2.0})
    assert BACKBONE_NEURON == NeuronConfig(detach_reset=True)
    assert ATTENTION_NEURON == NeuronConfig(v_threshold=0.5, detach_reset=True)


@pytest.mark.parametrize("name", ["ssa", "sdsa", "qkta", "qkca", "ff_lidiff"])
def test_attention_functions_neuron_equals_the_keyword_spelling(name):
    torch.manual_seed(2)
    q, k, v = ((torch.rand(3, 2, 8, 5) < 0.5).float() for _ in range(3))
    fn = getattr(AF, name)
    args = (q, k, v) if name in ("ssa", "sdsa") else (q, k)
    heads = () if name == "qkca" else (2,)
    keywords = dict(tau=3.0, v_threshold=0.3, detach_reset=False, surrogate="atan", backend="torch")
    got = fn(*args, *heads, neuron=ATTENTION_NEURON.replace(**keywords))
    want = fn(*args, *heads, **keywords)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.sum() > 0
    # and the default neuron is ATTENTION_NEURON
    torch.testing.assert_close(fn(*args, *heads), fn(*args, *heads, neuron=ATTENTION_NEURON), rtol=0, atol=0)


def _lifs(module: torch.nn.Module) -> list[tuple[str, LIF]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LIF)]


def test_attention_module_neuron_reaches_every_lif():
    cfg = NeuronConfig(tau=3.0, v_reset=None, decay_input=False, surrogate="atan", alpha=2.0, backend="torch")
    attn = AM.SpikeDrivenSelfAttention(8, 2, neuron=cfg, attn_v_threshold=0.25, stateful=True)
    lifs = _lifs(attn)
    assert {n for n, _ in lifs} == {"q_lif", "k_lif", "v_lif", "attn_lif", "shortcut_lif"}
    for n, lif in lifs:
        assert lif.neuron == cfg.replace(v_threshold=0.25 if n == "attn_lif" else cfg.v_threshold)
        assert lif.stateful
    same = AM.SpikingSelfAttention(8, 2, tau=3.0, surrogate="atan", alpha=2.0, backend="torch")
    explicit = AM.SpikingSelfAttention(
        8, 2, neuron=BACKBONE_NEURON.replace(tau=3.0, surrogate="atan", alpha=2.0, backend="torch")
    )
    assert [lif.neuron for _, lif in _lifs(same)] == [lif.neuron for _, lif in _lifs(explicit)]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_backbone_built_with_a_neuron_has_it_in_every_lif(name):
    """Every LIF (stem, attention, MLP, head) has the config's settings; the attention maps' neurons only
    differ in V_th (0.5, the modules' attn_v_threshold). The keyword spelling builds the same model."""
    cfg = NeuronConfig(
        tau=3.0,
        v_reset=None,
        decay_input=False,
        detach_reset=False,
        surrogate="atan",
        alpha=2.0,
        backend="torch",
    )
    model = create_model(name, neuron=cfg, stateful=True, **FAMILIES[name])
    assert model.neuron == cfg and model.stateful
    lifs = _lifs(model)
    assert len(lifs) > 5
    for n, lif in lifs:
        expected = cfg.replace(v_threshold=0.5) if n.endswith("attn_lif") else cfg
        assert lif.neuron == expected, n
        assert lif.stateful, n
    # The default neuron is BACKBONE_NEURON; the keywords set its fields, the same model as neuron=.
    keywords = dict(tau=3.0, surrogate="atan", alpha=2.0, backend="torch")
    a = create_model(name, **keywords, **FAMILIES[name])
    b = create_model(name, neuron=BACKBONE_NEURON.replace(**keywords), **FAMILIES[name])
    assert [lif.neuron for _, lif in _lifs(a)] == [lif.neuron for _, lif in _lifs(b)]
    assert create_model(name, **FAMILIES[name]).neuron == BACKBONE_NEURON
    torch.manual_seed(3)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 16, 16)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_spikecore_exports_the_config():
    assert spikecore.NeuronConfig is NeuronConfig and spikecore.BACKBONE_NEURON is BACKBONE_NEURON
