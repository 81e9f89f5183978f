"""SpiLiFormer against the authors' released code (github.com/KirinZheng/SpiLiFormer, fork
richardboone/spili_testing@23c6bf9): their weights converted into our models reproduce their outputs.

The fixtures (``fixtures/authors/<name>.pt``, see the README there) hold a small model of each of the five
reference files: its state dict under the authors' names, an input, the batched two-pass evaluation
(``eval``), the same passes one sample at a time (``eval_single``) and one training step (``train``).
Spikes are discrete and the fixture weights are float16-exact, so the forward passes agree exactly (the
tolerance only absorbs float summation order); gradients to a relative 1e-4.
"""

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from spikecore_testing import refuse_crafted_checkpoints
from spiliformer_testing import CONFIGS, cpu_trainer, paper_model

from spikecore.serialization import CheckpointError
from spiliformer import SpiLiFormer, create_model, load_authors_checkpoint
from spiliformer.cli import run as main
from spiliformer.convert import authors_state_dict, authors_variant, convert_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"
NAMES = ("cifar10", "cifar100", "cifar10dvs", "ncaltech101", "imagenet")
pytestmark = pytest.mark.skipif(
    not all((FIXTURES / f"{n}.pt").is_file() for n in NAMES), reason="authors' fixtures not generated"
)

# The fixtures' small models as our registry builds them (the constructor arguments in the fixture README).
CIFAR_SMALL = dict(embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=8, mlp_ratio=2.0, img_size=16)
DVS_SMALL = dict(embed_dims=(32, 64), depths=(1, 1), num_heads=16, mlp_ratio=2.0, img_size=32)
SMALL = {
    "cifar10": ("spiliformer_4_384", CIFAR_SMALL, dict(aug=1.0)),
    "cifar100": ("spiliformer_4_384", CIFAR_SMALL, dict(aug=2.0, decoder_bn_first=True)),
    "cifar10dvs": ("spiliformer_2_256_dvs", DVS_SMALL, dict(aug=1.0, kv_diff=True, decoder_bn=False)),
    "ncaltech101": ("spiliformer_2_256_dvs", DVS_SMALL, dict(aug=1.0, kv_diff=False, decoder_bn=True)),
    "imagenet": (
        "spiliformer_10_768",
        dict(embed_dims=(16, 32, 64), depths=(1, 2, 2), num_heads=4, mlp_ratio=2.0, img_size=32),
        dict(aug=1.0),
    ),
}
# The files whose decoder ends with the memory-reinterpreting reshape (authors_compat (b)).
RESHAPE_BUG = {"cifar10", "cifar10dvs", "ncaltech101"}
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    return request.param, torch.load(FIXTURES / f"{request.param}.pt", weights_only=True)


def ours(name: str, fx: dict, authors_compat: bool) -> SpiLiFormer:
    arch, arch_kwargs, options = SMALL[name]
    classes = fx["eval"]["logits1"].shape[1]
    model = create_model(
        arch,
        T=fx["T"],
        num_classes=classes,
        backend="torch",
        authors_compat=authors_compat,
        **arch_kwargs,
        **options,
    )
    model.load_state_dict(convert_state_dict(fx["state_dict"], model), strict=True)
    return model.eval()


def time_major(fx: dict) -> torch.Tensor:
    x = fx["input"].float()
    return x.transpose(0, 1) if x.dim() == 5 else x  # DVS: [B, T, ...] -> [T, B, ...]


def one_by_one(model: SpiLiFormer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dim = 1 if x.dim() == 5 else 0
    outs = [model.forward_passes(s) for s in x.split(1, dim=dim)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def test_the_fixtures_are_the_five_reference_files(fixture):
    name, fx = fixture
    assert "23c6bf9" in fx["source"] and authors_variant(fx["state_dict"]) == name
    model = ours(name, fx, authors_compat=False)
    assert sum(p.numel() for p in model.parameters()) == fx["small_param_count"]


def test_authors_compat_reproduces_their_outputs_exactly(fixture):
    """Their weights in our model with authors_compat: both passes equal theirs, batched (where their
    FB output LIF runs over T*B) and one sample at a time."""
    name, fx = fixture
    model, x = ours(name, fx, authors_compat=True), time_major(fx)
    with torch.no_grad():
        l1, l2 = model.forward_passes(x)
        s1, s2 = one_by_one(model, x)
    torch.testing.assert_close(l1, fx["eval"]["logits1"], **TOL)
    torch.testing.assert_close(l2, fx["eval"]["logits2"], **TOL)
    torch.testing.assert_close(s1, fx["eval_single"]["logits1"], **TOL)
    torch.testing.assert_close(s2, fx["eval_single"]["logits2"], **TOL)
    assert not torch.allclose(l2, s2, atol=1e-3)  # their batched outputs depend on the batch


def test_the_paper_faithful_model_is_independent_of_the_batch(fixture):
    """authors_compat=False: every sample's logits are those of the sample alone. They equal the authors'
    one-sample-at-a-time outputs (where the T*B output LIF is an ordinary LIF over T) except for pass 2 of
    the files whose decoder reshape scrambles the feedback."""
    name, fx = fixture
    model, x = ours(name, fx, authors_compat=False), time_major(fx)
    with torch.no_grad():
        l1, l2 = model.forward_passes(x)
        s1, s2 = one_by_one(model, x)
    torch.testing.assert_close(l1, s1, **TOL)
    torch.testing.assert_close(l2, s2, **TOL)
    torch.testing.assert_close(l1, fx["eval_single"]["logits1"], **TOL)
    if name in RESHAPE_BUG:
        assert not torch.allclose(l2, fx["eval_single"]["logits2"], atol=1e-3)
    else:
        torch.testing.assert_close(l2, fx["eval_single"]["logits2"], **TOL)


def test_a_training_step_matches_theirs(fixture):
    """Train mode (batch statistics in both passes), their loss with their beta, and the gradients of the
    parameters they recorded, mapped through the converter (so the permuted layouts are checked too)."""
    name, fx = fixture
    model, x, tr = ours(name, fx, authors_compat=True).train(), time_major(fx), fx["train"]
    l1, l2 = model.forward_passes(x)
    beta = tr["beta"]
    loss = (1 - beta) * F.cross_entropy(l1, tr["target"]) + beta * F.cross_entropy(l2, tr["target"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), tr["loss"], rtol=1e-6, atol=1e-6)
    # Their gradients as our parameters: a zero state dict with the recorded gradients, converted.
    grads = {k: torch.zeros(v.shape) for k, v in fx["state_dict"].items()}
    grads.update({k: g.float() for k, g in tr["grads"].items()})
    expected = convert_state_dict(grads, model)
    params = dict(model.named_parameters())
    checked = 0
    for key, g in expected.items():
        if key in params and g.abs().sum() > 0:
            torch.testing.assert_close(params[key].grad, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
            checked += 1
    assert checked >= len(tr["grads"]) - 1  # (their two prompts are our one [2, C] parameter)
    # Both passes update the last stage's BN statistics, as theirs.
    prefix = next(iter(tr["bn_running_after"])).rsplit(".", 1)[0]
    first_fb = model.backbone.blocks[model.feedback_blocks[0]].attn
    torch.testing.assert_close(
        first_fb.q_bn.running_mean, tr["bn_running_after"][f"{prefix}.running_mean"], **TOL
    )
    torch.testing.assert_close(
        first_fb.q_bn.running_var, tr["bn_running_after"][f"{prefix}.running_var"], **TOL
    )


PAPER_CONFIG = {
    "cifar10": "cifar10_4_384",
    "cifar100": "cifar100_4_384",
    "cifar10dvs": "cifar10dvs_2_256",
    "ncaltech101": "ncaltech101_2_256",
    "imagenet": "imagenet_10_768_224",
}


def test_the_full_paper_models_map_name_for_name_and_shape_for_shape(fixture):
    """Every tensor of the authors' full paper model (names and shapes recorded in the fixture) maps onto
    our model as its paper config builds it, and the parameter counts are equal."""
    name, fx = fixture
    module = paper_model(PAPER_CONFIG[name])
    full = {k: torch.zeros(s, dtype=torch.float16) for k, s in fx["full_state_dict_shapes"]}
    converted = convert_state_dict(full, module.net)  # raises on any name or shape that does not fit
    assert set(converted) == set(module.net.state_dict())
    assert sum(p.numel() for p in module.net.parameters()) == fx["full_param_count"]


# -- the converter on files --------------------------------------------------------------------------------
def authors_file(tmp_path: Path, name: str, **extra) -> Path:
    """The fixture's weights saved as the authors' training scripts save them (with their args)."""
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    args = argparse.Namespace(lr=1e-3, model="SpiLiFormer", beta=[0.5, 0.8], output_dir="./out")
    path = tmp_path / f"{name}.pth"
    torch.save({"model": {**fx["state_dict"], **extra}, "epoch": 3, "args": args}, path)
    return path


def test_load_authors_checkpoint_reads_the_architecture_from_the_weights(tmp_path):
    """Without a config: the variant (CIFAR-100 by its 100 classes: BN-first decoders, aug 2) and the
    sizes are read from the file; T and the heads are the published ones unless given."""
    fx = torch.load(FIXTURES / "cifar100.pt", weights_only=True)
    module = load_authors_checkpoint(authors_file(tmp_path, "cifar100"), T=2)
    hp = module.hparams
    assert hp.authors_compat and hp.decoder_bn_first and hp.aug == 2.0 and hp.num_classes == 100
    assert list(hp.arch_kwargs["embed_dims"]) == [16, 32, 64] and list(hp.arch_kwargs["depths"]) == [1, 1, 2]
    with torch.no_grad():
        _, l2 = module.net.forward_passes(fx["input"].float())
    torch.testing.assert_close(l2, fx["eval"]["logits2"], **TOL)
    paper = load_authors_checkpoint(authors_file(tmp_path, "cifar100"), T=2, authors_compat=False)
    assert not paper.hparams.authors_compat and not isinstance(
        paper.net.backbone.blocks[-1].attn.proj_lif, type(module.net.backbone.blocks[-1].attn.proj_lif)
    )


def test_what_is_not_an_authors_checkpoint_is_one_clear_error(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of the authors'"):
        authors_state_dict(foreign)
    ours_ckpt = tmp_path / "ours.ckpt"
    torch.save({"state_dict": {"net.backbone.head.weight": torch.zeros(2, 2)}}, ours_ckpt)
    with pytest.raises(CheckpointError, match="checkpoint of this package"):
        authors_state_dict(ours_ckpt)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        authors_state_dict(garbage)
    stray = authors_file(tmp_path, "cifar10", **{"stage3.0.ssa.extra_conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not mapped.*extra_conv"):
        load_authors_checkpoint(stray, T=2)
    with pytest.raises(CheckpointError, match="holds the authors' cifar10 model, not imagenet"):
        load_authors_checkpoint(authors_file(tmp_path, "cifar10"), variant="imagenet")


def test_a_config_that_does_not_fit_is_one_clear_error(tmp_path):
    small = authors_file(tmp_path, "cifar10")
    with pytest.raises(CheckpointError, match=r"does not fit this model.*other shapes"):
        load_authors_checkpoint(small, CONFIGS / "cifar10_4_384.yaml")  # the paper-size model
    with pytest.raises(CheckpointError, match="decoders are BN -> Linear -> LIF"):
        load_authors_checkpoint(authors_file(tmp_path, "cifar100"), CONFIGS / "cifar10_4_384.yaml")
    with pytest.raises(CheckpointError, match="does not fit"):  # the DVS weights in the N-Caltech101 model
        load_authors_checkpoint(authors_file(tmp_path, "cifar10dvs"), variant="cifar10dvs", kv_diff=False)


def fixture_override(tmp_path: Path) -> Path:
    """The cifar10 fixture's small model, the embedded digits at its 16x16, a CPU trainer."""
    override = {
        "trainer": cpu_trainer(tmp_path, limit_test_batches=2),
        "model": {"T": 2, "arch_kwargs": {**CIFAR_SMALL, "embed_dims": [16, 32, 64], "depths": [1, 1, 2]}},
        "data": {
            "class_path": "spikecore.data.DigitsDataModule",
            "init_args": {"root": str(tmp_path / "data"), "img_size": 16, "batch_size": 4, "num_workers": 0},
        },
    }
    path = tmp_path / "fixture_model.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def test_convert_then_test_end_to_end(tmp_path, capsys):
    """``spiliformer convert --from authors`` writes a checkpoint that ``spiliformer test --ckpt_path``
    takes: the model rebuilt from its hyper-parameters (authors_compat on) computes the authors' outputs."""
    fx = torch.load(FIXTURES / "cifar10.pt", weights_only=True)
    configs = ["--config", str(CONFIGS / "cifar10_4_384.yaml"), "--config", str(fixture_override(tmp_path))]
    out = tmp_path / "converted" / "spiliformer_cifar10.ckpt"
    res = main(["convert", "--from", "authors", str(authors_file(tmp_path, "cifar10")), str(out), *configs])
    assert res["variant"] == "cifar10" and res["parameters"] == 160_626 and out.is_file()
    assert "authors_compat true" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["hyper_parameters"]["authors_compat"] is True and "pytorch-lightning_version" in saved
    cli = main(["test", *configs, "--ckpt_path", str(out)])
    assert "test/acc" in cli.trainer.callback_metrics
    net = cli.model.net.eval()
    assert net.authors_compat
    with torch.no_grad():
        _, l2 = net.forward_passes(fx["input"].float())
    torch.testing.assert_close(l2, fx["eval"]["logits2"], **TOL)
    # Refused before anything is written: an existing output, unless --overwrite.
    with pytest.raises(CheckpointError, match="exists"):
        main(["convert", "--from", "authors", str(authors_file(tmp_path, "cifar10")), str(out), *configs])
    paper = main(
        [
            "convert",
            "--from",
            "authors",
            str(authors_file(tmp_path, "cifar10")),
            str(out),
            *configs,
            "--overwrite",
            "--no-authors-compat",
        ]
    )
    assert not paper["authors_compat"]
    assert torch.load(out, weights_only=True)["hyper_parameters"]["authors_compat"] is False


def test_a_crafted_file_given_to_convert_runs_nothing(tmp_path):
    """A file that would run code when unpickled, from disk or a URL: one error line, exit 2, nothing
    written, no request made."""
    out = tmp_path / "out.ckpt"
    refuse_crafted_checkpoints(
        tmp_path,
        "spiliformer",
        lambda source, named: [["convert", "--from", "authors", source, str(out)]],
    )
    assert not out.exists()
