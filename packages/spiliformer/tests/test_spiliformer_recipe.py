"""Each paper config builds the authors' model and follows their recipe (counts, decoders, beta, weight
decay, initialisation, schedule): the values read from their train scripts / ymls at 23c6bf9."""

from types import SimpleNamespace

import pytest
import torch
import yaml
from spiliformer_testing import CONFIGS, paper_model

from spikecore import LIF
from spikecore.errors import ConfigError
from spiliformer import SpiLiFormerClassifier, beta_at
from spiliformer.feedback import FeedbackDecoder
from spiliformer.model import TimeBatchLIF

# Parameters of the authors' models as their train scripts build them (counted on their code).
AUTHORS_COUNTS = {
    "cifar10_4_384": 7_003_450,
    "cifar100_4_384": 7_038_100,
    "cifar10dvs_2_256": 1_702_282,
    "ncaltech101_2_256": 1_594_085,
    "imagenet_10_768_224": 69_103_816,
    "imagenet_10_768_288": 69_103_816,
    "imagenet_10_768_384": 69_103_816,
}
# (decoder BN, BN first, K^T V difference, chain order) of each reference file.
AUTHORS_DECODERS = {
    "cifar10_4_384": (True, False, False, "backward"),
    "cifar100_4_384": (True, True, False, "backward"),
    "cifar10dvs_2_256": (False, False, True, "backward"),
    "ncaltech101_2_256": (True, False, False, "backward"),
    "imagenet_10_768_224": (True, False, False, "forward"),
}


def cfg(stem: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())


@pytest.mark.parametrize("stem", sorted(AUTHORS_COUNTS))
def test_every_paper_config_has_the_authors_parameter_count(stem):
    module = paper_model(stem)
    assert sum(p.numel() for p in module.parameters()) == AUTHORS_COUNTS[stem]
    assert not module.hparams.authors_compat  # the paper's computation by default


@pytest.mark.parametrize("stem", sorted(AUTHORS_DECODERS))
def test_every_paper_config_builds_the_authors_feedback_path(stem):
    net = paper_model(stem).net
    bn, bn_first, kv_diff, order = AUTHORS_DECODERS[stem]
    for dec in net.generator.decoders:
        assert (dec.bn is not None, dec.bn_first, dec.authors_reshape) == (bn, bn_first, False)
    assert net.generator.order == order
    fb_attn = {type(net.backbone.blocks[i].attn).__name__ for i in net.feedback_blocks}
    assert fb_attn == {"KVDifferenceAttention" if kv_diff else "FBLiDiffAttention"}


def test_decoder_order_bn_first_is_bn_linear_lif():
    torch.manual_seed(0)
    dec = FeedbackDecoder(8, bn=True, bn_first=True).eval()
    dec.bn.running_mean.uniform_(-1, 1)
    dec.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 2, 8, 5)
    bn = (x - dec.bn.running_mean[:, None]) / torch.sqrt(dec.bn.running_var[:, None] + dec.bn.eps)
    pre = torch.einsum("oc,tbcn->tbon", dec.linear.weight, bn) * 40  # large enough to fire
    dec.linear.weight.data *= 40
    torch.testing.assert_close(dec(x), dec.lif(pre))
    with pytest.raises(ValueError, match="decoder_bn is off"):
        FeedbackDecoder(8, bn=False, bn_first=True)


def test_authors_compat_switches_both_behaviours_only_where_their_file_has_them():
    for stem, reshape in [("cifar10_4_384", True), ("cifar100_4_384", False), ("imagenet_10_768_224", False)]:
        net = paper_model(stem, authors_compat=True).net
        assert all(
            isinstance(net.backbone.blocks[i].attn.proj_lif, TimeBatchLIF) for i in net.feedback_blocks
        )
        assert all(d.authors_reshape == reshape for d in net.generator.decoders)
        assert not any(
            isinstance(b.attn.proj_lif, TimeBatchLIF) for b in net.backbone.blocks[: net.feedback_blocks[0]]
        )
    for stem in ("cifar10dvs_2_256", "ncaltech101_2_256"):
        assert all(d.authors_reshape for d in paper_model(stem, authors_compat=True).net.generator.decoders)


def test_time_batch_lif_runs_the_batch_as_time():
    """Input 1.5 (tau 2, V_th 1): a sample alone fires at its second step only; run as the authors' T*B
    sequence (t0,b0), (t0,b1), (t0,b2), (t1,b0), ... every second step of that sequence fires instead."""
    x = torch.full((2, 3, 1), 1.5)  # [T, B, C]
    plain = LIF(v_threshold=1.0, v_reset=0.0, detach_reset=True, backend="torch")
    assert plain(x)[:, :, 0].tolist() == [[0, 0, 0], [1, 1, 1]]
    flat = TimeBatchLIF.like(plain)
    assert flat(x)[:, :, 0].tolist() == [[0, 1, 0], [1, 0, 1]]


def test_beta_schedule_is_the_authors_per_epoch_ramp():
    ramp = {"start": 0.5, "end": 0.8}
    assert beta_at(0.8, 17, 410) == 0.8
    assert beta_at(ramp, 0, 130) == 0.5
    assert beta_at(ramp, 65, 130) == pytest.approx(0.65)
    assert beta_at(ramp, 129, 130) == pytest.approx(0.5 + 0.3 * 129 / 130)  # 0.7977, as their Betascheduler
    assert beta_at(ramp, 3, None) == 0.5
    dvs = paper_model("cifar10dvs_2_256")
    assert dvs.hparams.beta == ramp and cfg("cifar10dvs_2_256")["trainer"]["max_epochs"] == 130
    dvs._trainer = SimpleNamespace(max_epochs=130, current_epoch=26)
    assert dvs.beta == pytest.approx(0.56)
    assert [paper_model(s).beta for s in ("cifar10_4_384", "ncaltech101_2_256", "imagenet_10_768_224")] == [
        0.8,
        0.5,
        0.5,
    ]
    for bad in (1.5, {"start": 0.5, "end": 1.2}):
        with pytest.raises(ConfigError, match="beta"):
            SpiLiFormerClassifier(arch="spiliformer_4_384", beta=bad)


def small_module(**kw) -> SpiLiFormerClassifier:
    arch_kwargs = dict(embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=4, img_size=16, backend="torch")
    module = SpiLiFormerClassifier(arch="spiliformer_4_384", T=2, arch_kwargs=arch_kwargs, **kw)
    module._trainer = SimpleNamespace(estimated_stepping_batches=410 * 10, max_epochs=410)
    return module


def test_the_prompts_are_not_weight_decayed():
    module = small_module(weight_decay=0.06)
    opt = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert decay_of[id(named["net.generator.prompts"])] == 0.0
    assert decay_of[id(named["net.generator.decoders.0.linear.weight"])] == 0.06
    assert decay_of[id(named["net.backbone.head.weight"])] == 0.06
    assert decay_of[id(named["net.backbone.head.bias"])] == 0.0
    assert module.no_weight_decay() == {"net.generator.prompts"}


def test_cooldown_holds_min_lr_for_the_last_epochs():
    module = small_module(lr=1e-3, min_lr=1e-5, warmup_epochs=20, cooldown_epochs=10)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factor = sched.lr_lambdas[0]
    assert factor(400 * 10) == pytest.approx(1e-2) and factor(405 * 10) == pytest.approx(1e-2)
    assert factor(399 * 10) > 1e-2  # the cosine ends at epoch 400 of 410
    assert factor(20 * 10) == pytest.approx(1.0)


def test_decoder_linear_is_trunc_normal_002():
    torch.manual_seed(0)
    w = FeedbackDecoder(384).linear.weight.detach()
    assert w.std().item() == pytest.approx(0.02, rel=0.03) and abs(w.mean().item()) < 1e-3
    # Normal tails (PyTorch's default kaiming-uniform would stop at 1/sqrt(384) = 0.051).
    assert 0.06 < w.abs().max().item() <= 2.0


def test_the_recipe_values_are_the_authors():
    for stem in ("cifar10_4_384", "cifar100_4_384"):
        c = cfg(stem)
        m, d = c["model"], c["data"]["init_args"]
        assert (c["trainer"]["max_epochs"], m["cooldown_epochs"], m["warmup_epochs"]) == (410, 10, 20)
        assert (m["lr"], m["min_lr"], m["weight_decay"], m["mixup"], m["mixup_off_epoch"]) == (
            1e-3,
            1e-5,
            0.06,
            0.5,
            200,
        )
        assert (d["crop_padding"], d["random_erasing"], d["auto_augment"]) == (
            0,
            0.25,
            "rand-m9-n1-mstd0.4-inc1",
        )
    c100 = cfg("cifar100_4_384")
    assert c100["model"]["decoder_bn_first"] and c100["model"]["aug"] == 2.0
    assert c100["data"]["init_args"]["mean"] == [0.4914, 0.4822, 0.4465]  # CIFAR-10's, as their yml
    for stem in ("cifar10dvs_2_256", "ncaltech101_2_256"):
        c = cfg(stem)
        m = c["model"]
        assert (c["trainer"]["max_epochs"], m["cooldown_epochs"], m["warmup_epochs"]) == (130, 10, 10)
        assert (m["lr"], m["weight_decay"], m["mixup"], m["mixup_prob"], m["mixup_off_epoch"]) == (
            5e-3,
            0.06,
            0.5,
            0.5,
            75,
        )
    nc = cfg("ncaltech101_2_256")["model"]
    assert (nc["beta"], nc["kv_diff"], nc["decoder_bn"]) == (0.5, False, True)
    assert cfg("imagenet_10_768_224")["model"]["min_lr"] == 1e-6
    for r in (288, 384):
        assert cfg(f"imagenet_10_768_{r}")["data"]["init_args"]["crop_pct"] == 1.0
