"""The four SAE kinds: planted-dictionary recovery, the paper's loss, AuxK, JumpReLU gradients, BatchTopK."""

import math
import time

import pytest
import pytorch_lightning as pl
import torch
from sae_brainmap_testing import recovery

from sae_brainmap import KINDS, batch_metrics, make_sae, train_sae
from sae_brainmap.module import SAEModule, _ShuffledBatches

# Kind -> options that make it learn a 64-atom dictionary from 20k samples in a few CPU seconds.
PLANTED = {
    "relu_l1": dict(lr=1e-2, l1_coeff=0.1),
    "topk": dict(lr=3e-3, k=3),
    "batchtopk": dict(lr=3e-3, k=3),
    "jumprelu": dict(lr=1e-2, l0_coeff=1e-2, bandwidth=0.05, init_threshold=0.1),
}
THRESHOLD = 0.93  # mean best cosine; random unit vectors score about 0.5 here (checked below)
CPU_BUDGET_S = 20.0  # process CPU seconds per kind (about 2.5 s measured on one core)


@pytest.mark.parametrize("kind", KINDS)
def test_planted_dictionary_is_recovered(kind, planted):
    D, X = planted
    untrained = (
        make_sae(kind, 32, 128, init_seed=0, k=3) if "topk" in kind else make_sae(kind, 32, 128, init_seed=0)
    )
    assert recovery(D, untrained.decoder_directions) < 0.7
    start = time.process_time()
    sae = train_sae(X, kind, 128, batch_size=256, epochs=10, **PLANTED[kind])
    cpu = time.process_time() - start
    assert recovery(D, sae.decoder_directions) > THRESHOLD
    assert cpu < CPU_BUDGET_S
    x_hat, z = sae(X[:2000])
    m = batch_metrics(X[:2000], x_hat, z)
    assert m["fve"] > 0.85 and m["l0"] < 12  # sparse codes that reconstruct (3 atoms are active)
    assert sae.decoder_directions.shape == (128, 32)


def test_relu_l1_loss_is_the_papers_formula_on_hand_made_tensors():
    sae = make_sae("relu_l1", 2, 3)
    assert sae.config.tied and sae.W_dec is None and sae.config.input_norm == "none"
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        sae.b_lat.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.b_pre.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[3.0, 1.0], [0.0, -2.0]])
    # By hand. Token 1: x - b_pre = (2, 1); pre = (2, 2 - 1, 2 - 1 + 0.5) = (2, 1, 1.5); z = (2, 1, 1.5)
    # x_hat = W^T z + b_pre = (2 + 1.5 + 1, 2 - 1.5) = (4.5, 0.5); err = 1.5^2 + 0.5^2 = 2.5; ||x||^2 = 10
    # Token 2: x - b_pre = (-1, -2); pre = (-1, -4 - 1, -1 + 2 + 0.5) = (-1, -5, 1.5); z = (0, 0, 1.5)
    # x_hat = (1.5 + 1, -1.5) = (2.5, -1.5); err = 2.5^2 + 0.5^2 = 6.5; ||x||^2 = 4
    z_hand = torch.tensor([[2.0, 1.0, 1.5], [0.0, 0.0, 1.5]])
    x_hat_hand = torch.tensor([[4.5, 0.5], [2.5, -1.5]])
    nmse = (2.5 / 10 + 6.5 / 4) / 2
    l1 = (4.5 / math.sqrt(10) + 1.5 / 2) / 2
    out = sae.loss(x)
    torch.testing.assert_close(out["z"], z_hand)
    torch.testing.assert_close(out["x_hat"], x_hat_hand)
    assert out["loss"].item() == pytest.approx(nmse + 0.00086 * l1, rel=1e-6)
    x_hat, z = sae(x)
    torch.testing.assert_close(x_hat, x_hat_hand)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat_hand)
    torch.testing.assert_close(z, z_hand)


def _revived_fraction(aux_coeff: float) -> float:
    """Train a TopK SAE whose latents 32..127 start dead; return the fraction of them firing afterwards.

    They are dead by competition, as in practice: latents 0..31 get a +5 bias so they always win the top
    k, while the others' pre-activations are positive but never large enough to be selected."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(8000, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    sae = make_sae("topk", 16, 128, init_seed=0, k=4, dead_tokens=2000, aux_coeff=aux_coeff, aux_k=32)
    sae.init_from_data(X)
    with torch.no_grad():
        sae.b_lat[:32] = 5.0
    _, z = sae.eval()(X)
    assert (z[:, 32:] != 0).sum() == 0  # dead at the start, on every token
    module = SAEModule({"x": sae}, lr=1e-2, log_every_n_steps=10**9)
    module.initialized.fill_(True)  # keep the forced biases
    batches = [{"x": b["sae"]} for b in _ShuffledBatches(X, 256, 0)] * 8
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    _, z = sae.eval()(X)
    return float((z[:, 32:] != 0).any(0).float().mean())


def test_auxk_revives_dead_latents():
    with_aux, without = _revived_fraction(1 / 32), _revived_fraction(0.0)
    # Without AuxK the dead latents get no gradient and only come back as the live ones' biases shrink.
    assert with_aux >= 0.45
    assert with_aux >= without + 0.15


def test_jumprelu_pseudo_derivatives_match_the_paper():
    eps, theta0 = 0.1, 0.5
    sae = make_sae("jumprelu", 2, 2, init_threshold=theta0, bandwidth=eps, pre_bias=False, input_norm="none")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
    # pre = x; latent 0 at 0.52 (inside the window |pre - theta| < eps/2), latent 1 at 0.9 (outside)
    x = torch.tensor([[0.52, 0.9]], requires_grad=True)
    z = sae.encode(x)
    torch.testing.assert_close(z, torch.tensor([[0.52, 0.9]]))
    z.sum().backward()
    # dz/dtheta = -(theta / eps) K(.) = -5 for latent 0, 0 for latent 1; theta = exp(log_theta)
    g = sae.log_threshold.grad
    torch.testing.assert_close(g, torch.tensor([-(theta0 / eps) * theta0, 0.0]))
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0]]))  # H(pre - theta), straight through
    sae.zero_grad()
    # The L0 term: dH/dtheta = -(1 / eps) K(.)
    out = sae.loss(torch.tensor([[0.52, 0.9]]))
    (out["sparsity"]).backward()
    assert out["sparsity"].item() == 2.0
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([-(1 / eps) * theta0, 0.0]))


def test_batchtopk_keeps_k_per_token_on_average_and_thresholds_at_inference():
    sae = make_sae("batchtopk", 8, 32, init_seed=0, k=2, input_norm="none")
    x = torch.randn(50, 8)
    z = sae.train().encode(x)
    assert int((z != 0).sum()) == 100  # k x batch over the whole batch, not per token
    assert (z != 0).sum(1).max() > 2 or (z != 0).sum(1).min() < 2  # so not exactly k each
    thr = float(sae.threshold)
    assert thr == pytest.approx(float(z[z != 0].min()))
    z_eval = sae.eval().encode(x)
    pre = sae.pre_activations(x)
    torch.testing.assert_close(z_eval, pre * (pre > thr))


@pytest.mark.parametrize("tied", [True, False])
def test_unit_norm_decoder_and_tying_hold_after_training(tied, planted):
    _, X = planted
    sae = train_sae(X[:4096], "topk", 64, k=3, tied=tied, batch_size=512, epochs=2, lr=1e-2)
    norms = sae.decoder_directions.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert (sae.W_dec is None) == tied
    if tied:
        assert sae.decoder_directions.data_ptr() == sae.W_enc.data_ptr()


@pytest.mark.parametrize("tied", [False, True])
def test_topk_sparse_training_path_matches_the_dense_definition(tied):
    """``loss`` takes a sparse path for TopK; its value and every gradient equal the plain dense maths."""
    sae = make_sae("topk", 24, 96, init_seed=2, k=5, tied=tied, aux_coeff=0.0)
    x = torch.randn(50, 24) * 2 + 1
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_pre.add_(0.3)
        sae.b_lat.add_(0.1 * torch.randn(96))

    def dense_reference():
        xc = x / sae.input_scale - sae.b_pre
        pre = xc @ sae.W_enc.T + sae.b_lat
        top = pre.topk(5, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        x_hat = (z @ sae.decoder_weight + sae.b_pre) * sae.input_scale
        return ((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()

    grads = []
    for fn in (lambda: sae.loss(x)["loss"], dense_reference):
        sae.zero_grad()
        loss = fn()
        loss.backward()
        grads.append(
            (loss.item(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
        )
    (l_sparse, g_sparse), (l_dense, g_dense) = grads
    assert l_sparse == pytest.approx(l_dense, rel=1e-6)
    assert g_sparse.keys() == g_dense.keys() and "W_enc" in g_sparse
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-6)
