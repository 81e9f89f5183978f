"""Sparse autoencoders: ``relu_l1`` (the paper's), ``topk`` (+AuxK), ``batchtopk`` and ``jumprelu``.

Every SAE has the same four names, which other parts of the project rely on:
``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) -> (x_hat, z)`` and ``decoder_directions``
(``[n_latents, d_in]``, the rows that ``decode`` sums: ``x_hat = z @ decoder_directions * scale + b_pre``).

All kinds share ``pre = W_enc (x / scale - b_pre) + b_lat`` and ``x_hat = scale * (z W_dec + b_pre)``,
where ``W_dec = W_enc`` when tied and ``scale`` is 1 unless ``input_norm="scale"`` (then it is set from
the data so that E||x / scale||^2 = d_in, as Gao et al. and Rajamanoharan et al. do).
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("relu_l1", "topk", "batchtopk", "jumprelu")
INITS = ("unit", "torch")

# Learning rate at a reference width, scaled as Gao et al. (2024) do: lr = lr_ref / sqrt(n / n_ref).
# TopK-like kinds: their 2e-4 at 2^14 latents; relu_l1: the authors' 5e-5 at their 12,288 latents.
_LR_REFERENCE: dict[str, tuple[float, int]] = {
    "relu_l1": (5e-5, 12288),
    "topk": (2e-4, 2**14),
    "batchtopk": (2e-4, 2**14),
    "jumprelu": (2e-4, 2**14),
}


def default_lr(kind: str, n_latents: int) -> float:
    """The learning rate used when none is given: ``lr_ref / sqrt(n_latents / n_ref)`` (Gao et al. 2024's
    scaling with the number of latents), from 2e-4 at 2^14 latents (relu_l1: the authors' 5e-5 at
    12,288). 2^14 latents: 2e-4; 12,288: 2.3e-4; 512: 1.1e-3."""
    if kind not in _LR_REFERENCE:
        raise ValueError(f"unknown SAE kind {kind!r}; choose one of {KINDS}")
    lr_ref, n_ref = _LR_REFERENCE[kind]
    return lr_ref / math.sqrt(n_latents / n_ref)


# Per-kind defaults: the paper's ReLU-L1 SAE is tied, without a unit-norm decoder or input scaling; the
# modern kinds follow their papers (untied, unit-norm decoder, inputs scaled to E||x||^2 = d).
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "relu_l1": {"tied": True, "unit_norm_decoder": False, "input_norm": "none"},
    "topk": {"tied": False, "unit_norm_decoder": True, "input_norm": "scale", "k": 64},
    "batchtopk": {"tied": False, "unit_norm_decoder": True, "input_norm": "scale", "k": 64},
    "jumprelu": {"tied": False, "unit_norm_decoder": False, "input_norm": "scale"},
}


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE (it is saved in every checkpoint)."""

    kind: str
    d_in: int
    n_latents: int
    tied: bool | None = None  # None: the kind's default
    unit_norm_decoder: bool | None = None
    input_norm: str | None = None  # "none" | "scale"
    pre_bias: bool = True
    k: int | None = None  # topk / batchtopk: active latents per token (batchtopk: on average)
    l1_coeff: float = 0.00086  # relu_l1: the authors' coefficient
    aux_k: int | None = None  # topk / batchtopk: latents in the AuxK reconstruction (None: min(512, n/2))
    aux_coeff: float = 1 / 32  # Gao et al.'s alpha
    dead_tokens: int = 1_000_000  # a latent that has not fired for this many tokens is dead
    l0_coeff: float = 1e-3  # jumprelu: lambda of the L0 penalty
    bandwidth: float = 1e-3  # jumprelu: epsilon of the rectangle pseudo-derivative
    init_threshold: float = 1e-3  # jumprelu: initial theta
    # "unit": decoder rows random unit vectors, encoder their transpose, b_pre the data mean (Gao et al.);
    # "torch": the authors' (PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)), zero biases, b_pre 0)
    init: str = "unit"
    # Provenance: where the activations came from (not used by the maths, needed to use the SAE).
    layer: int | None = None
    backbone: str | None = None
    tokens: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown SAE kind {self.kind!r}; choose one of {KINDS}")
        for key, value in _KIND_DEFAULTS[self.kind].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.input_norm not in ("none", "scale"):
            raise ValueError(f"input_norm must be 'none' or 'scale', got {self.input_norm!r}")
        if self.kind in ("topk", "batchtopk") and not 0 < self.k <= self.n_latents:
            raise ValueError(f"k={self.k} must be in 1..n_latents={self.n_latents}")
        if self.aux_k is None:
            self.aux_k = max(1, min(512, self.n_latents // 2))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SAE config keys {sorted(unknown)}")
        return cls(**d)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta); d/dpre = H(pre - theta), d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        rect = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * rect * grad
        return grad * (pre > theta), grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - theta) with the pseudo-derivative d/dtheta = -(1 / eps) K((pre - theta) / eps) only."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        rect = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(1.0 / eps) * rect * grad
        return None, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


_CHUNK = 256  # tokens per chunk in the sparse products: bounds the [chunk, k, d] temporaries


def _argsort(flat: Tensor) -> Tensor:
    # torch's CPU sort of 64k integers takes ~0.2 s in torch 2.x builds here; numpy's takes ~8 ms.
    if flat.device.type == "cpu":
        return torch.from_numpy(flat.numpy().argsort(kind="stable"))
    return flat.argsort()


def _scatter_outer(idx: Tensor, coef: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """``out[i] = sum over (n, j) with idx[n, j] = i of coef[n, j] * rows[n]``: ``[n_out, d]``, as a
    CSR sparse [n_out, n] x dense [n, d] product."""
    flat = idx.reshape(-1)
    order = _argsort(flat)
    crow = torch.zeros(n_out + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.bincount(flat, minlength=n_out).cumsum(0)
    cols = torch.div(order, idx.shape[1], rounding_mode="floor")
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore")
        sparse = torch.sparse_csr_tensor(crow, cols, coef.reshape(-1)[order], (n_out, len(rows)))
    return sparse @ rows


def _gather_dot(idx: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
    """``out[n, j] = <rows[n], weight[idx[n, j]]>``: ``[n, k]``."""
    out = rows.new_empty(idx.shape)
    for lo in range(0, len(idx), _CHUNK):
        w = weight[idx[lo : lo + _CHUNK]]  # [c, k, d]
        out[lo : lo + _CHUNK] = torch.bmm(w, rows[lo : lo + _CHUNK, :, None])[..., 0]
    return out


class _GatherLinear(torch.autograd.Function):
    """``(xc @ W.T + b).gather(1, idx)`` given the dense result ``pre``; the backward pass touches only
    the gathered entries, so TopK training needs one dense [n, d] x [d, m] product instead of five."""

    @staticmethod
    def forward(ctx, xc: Tensor, weight: Tensor, bias: Tensor, pre: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(xc, weight, idx)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, weight, idx = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = (
            F.embedding_bag(idx, weight, per_sample_weights=grad, mode="sum")
            if ctx.needs_input_grad[0]
            else None
        )
        grad_w = _scatter_outer(idx, grad, xc, weight.shape[0]) if ctx.needs_input_grad[1] else None
        grad_b = grad.new_zeros(weight.shape[0]).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """``x[n] = sum_j vals[n, j] W[idx[n, j]]`` with a backward pass that never forms [n, m] tensors."""

    @staticmethod
    def forward(ctx, idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(idx, vals, weight)
        return F.embedding_bag(idx, weight, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        idx, vals, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_vals = _gather_dot(idx, weight, grad) if ctx.needs_input_grad[1] else None
        grad_w = _scatter_outer(idx, vals, grad, weight.shape[0]) if ctx.needs_input_grad[2] else None
        return None, grad_vals, grad_w


class SAE(nn.Module):
    """One sparse autoencoder; ``kind`` picks the activation and the loss (see :data:`KINDS`)."""

    def __init__(self, config: SAEConfig, init_seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        gen = torch.Generator().manual_seed(init_seed) if init_seed is not None else None
        if c.init == "unit":  # decoder rows random unit vectors, the encoder their transpose (Gao et al.)
            w = torch.randn(c.n_latents, c.d_in, generator=gen)
            w = w / w.norm(dim=1, keepdim=True)
            w_dec = w.clone()
        else:  # the authors': nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for each layer
            w = (torch.rand(c.n_latents, c.d_in, generator=gen) * 2 - 1) / math.sqrt(c.d_in)
            w_dec = (torch.rand(c.n_latents, c.d_in, generator=gen) * 2 - 1) / math.sqrt(c.n_latents)
            if c.unit_norm_decoder:
                w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = None if c.tied else nn.Parameter(w_dec)
        self.b_lat = nn.Parameter(torch.zeros(c.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(c.d_in), requires_grad=c.pre_bias)
        if c.kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((c.n_latents,), math.log(c.init_threshold)))
        # batchtopk's inference threshold: running mean of the smallest activation kept in training.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(c.n_latents, dtype=torch.long))

    # ------------------------------------------------------------------------------------- the interface
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def decoder_weight(self) -> Tensor:
        return self.W_enc if self.W_dec is None else self.W_dec

    @property
    def decoder_directions(self) -> Tensor:
        """``[n_latents, d_in]``: the rows ``decode`` sums (detached)."""
        return self.decoder_weight.detach()

    def pre_activations(self, x: Tensor) -> Tensor:
        xn = x / self.input_scale
        if self.config.pre_bias:
            xn = xn - self.b_pre
        return xn @ self.W_enc.T + self.b_lat

    def encode(self, x: Tensor) -> Tensor:
        return self._activate(self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        out = z @ self.decoder_weight
        if self.config.pre_bias:
            out = out + self.b_pre
        return out * self.input_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    # ------------------------------------------------------------------------------------- activations
    def _activate(self, pre: Tensor) -> Tensor:
        kind = self.config.kind
        if kind == "relu_l1":
            return F.relu(pre)
        if kind == "topk":
            vals, idx = pre.topk(self.config.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        if kind == "batchtopk":
            if self.training:
                return self._batch_topk(F.relu(pre))
            return pre * (pre > self.threshold)
        return _JumpReLU.apply(pre, self.log_threshold.exp(), self.config.bandwidth)

    def _batch_topk(self, acts: Tensor) -> Tensor:
        flat = acts.reshape(-1)
        n_keep = min(self.config.k * acts.reshape(-1, acts.shape[-1]).shape[0], flat.numel())
        vals, idx = flat.topk(n_keep)
        z = torch.zeros_like(flat).scatter(0, idx, vals).reshape(acts.shape)
        kept = vals[vals > 0]
        if kept.numel():  # Bussmann et al.: inference threshold from the training batches
            with torch.no_grad():
                self.threshold.lerp_(kept.min().to(self.threshold.dtype), 0.01 if self.threshold > 0 else 1.0)
        return z

    # -------------------------------------------------------------------------------------------- loss
    def _topk_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """TopK on the sparse path: (pre without grad, dense z, x_hat, gather); values as the dense path."""
        xc = x / self.input_scale
        if self.config.pre_bias:
            xc = xc - self.b_pre
        with torch.no_grad():
            pre = torch.addmm(self.b_lat, xc, self.W_enc.T)
            idx = pre.topk(self.config.k, dim=-1).indices
        vals = F.relu(_GatherLinear.apply(xc, self.W_enc, self.b_lat, pre, idx))
        out = _SparseDecode.apply(idx, vals, self.decoder_weight)
        if self.config.pre_bias:
            out = out + self.b_pre
        z = torch.zeros_like(pre).scatter_(-1, idx, vals.detach())

        def gather(sel: Tensor) -> Tensor:  # differentiable pre-activations at chosen latents (for AuxK)
            return _GatherLinear.apply(xc, self.W_enc, self.b_lat, pre, sel)

        return pre, z, out * self.input_scale, gather

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        """Training objective of this kind, with its parts. Updates dead-latent bookkeeping in training."""
        c = self.config
        if c.kind == "topk" and x.dim() == 2:
            pre, z, x_hat, gather = self._topk_sparse(x)
        else:
            pre = self.pre_activations(x)
            z = self._activate(pre)
            x_hat = self.decode(z)

            def gather(sel: Tensor) -> Tensor:
                return pre.gather(-1, sel)

        x_norm2 = x.pow(2).sum(-1).clamp_min(1e-12)
        nmse = ((x - x_hat).pow(2).sum(-1) / x_norm2).mean()
        out = {"x_hat": x_hat, "z": z, "nmse": nmse}
        if self.training:
            self._track_firing(z)
        if c.kind == "relu_l1":
            out["sparsity"] = (z.abs().sum(-1) / x_norm2.sqrt()).mean()
            out["loss"] = nmse + c.l1_coeff * out["sparsity"]
        elif c.kind in ("topk", "batchtopk"):
            out["aux"] = self._aux_loss(x, x_hat, pre, gather)
            out["loss"] = nmse + c.aux_coeff * out["aux"]
        else:
            theta = self.log_threshold.exp()
            out["sparsity"] = _Step.apply(pre, theta, c.bandwidth).sum(-1).mean()
            out["loss"] = nmse + c.l0_coeff * out["sparsity"]
        return out

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.config.dead_tokens

    def _track_firing(self, z: Tensor) -> None:
        with torch.no_grad():
            fired = (z.reshape(-1, z.shape[-1]) != 0).any(0)
            self.tokens_since_fired += z.reshape(-1, z.shape[-1]).shape[0]
            self.tokens_since_fired[fired] = 0

    def _aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, gather) -> Tensor:
        """AuxK (Gao et al.): the top-``aux_k`` dead latents reconstruct the residual x - x_hat.
        ``gather(idx)`` gives their pre-activations with gradients to the encoder."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k = min(self.config.aux_k, n_dead)
        with torch.no_grad():
            idx = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1).indices
        vals = F.relu(gather(idx).reshape(-1, k))
        residual = ((x - x_hat) / self.input_scale).detach().reshape(-1, x.shape[-1])
        e_hat = _SparseDecode.apply(idx.reshape(-1, k), vals, self.decoder_weight)
        return (residual - e_hat).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)

    # ----------------------------------------------------------------------------- training utilities
    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set the input scale (``input_norm="scale"``) and b_pre (the data mean; it stays 0 with the
        authors' ``init="torch"``) from a sample."""
        x = x.float()
        if self.config.input_norm == "scale":
            self.input_scale.fill_((x.pow(2).sum(-1).mean() / x.shape[-1]).sqrt().clamp_min(1e-8))
        if self.config.pre_bias and self.config.init == "unit":
            self.b_pre.copy_((x / self.input_scale).mean(0))

    @torch.no_grad()
    def project_decoder_grads(self) -> None:
        """With a unit-norm decoder, drop the gradient component along each row (it would only change
        the norm that ``normalize_decoder`` resets)."""
        w = self.decoder_weight
        if self.config.unit_norm_decoder and w.grad is not None:
            unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
            w.grad -= (w.grad * unit).sum(1, keepdim=True) * unit

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.config.unit_norm_decoder:
            w = self.decoder_weight
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)


def make_sae(kind: str, d_in: int, n_latents: int, init_seed: int | None = None, **options: Any) -> SAE:
    """Build an SAE: ``make_sae("topk", 768, 12288, k=64)``; options are :class:`SAEConfig` fields."""
    return SAE(SAEConfig(kind=kind, d_in=d_in, n_latents=n_latents, **options), init_seed=init_seed)
