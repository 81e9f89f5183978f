"""Surrogate gradients for the spike's Heaviside step (the equations of reference.py).

Each surrogate is a derivative ``sigma'(x)`` used in place of the Heaviside's derivative, where
``x = H - V_th``, plus a smooth primitive ``g`` with ``g' = sigma'`` that the float64 gradient checks use
as a differentiable stand-in for the step. Kernels select a surrogate by its integer id.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Surrogate:
    name: str
    id: int  # the code the fused kernels branch on
    default_alpha: float


SURROGATES: dict[str, Surrogate] = {
    s.name: s
    for s in (
        Surrogate("sigmoid", 0, 4.0),
        Surrogate("atan", 1, 2.0),
        Surrogate("piecewise_quadratic", 2, 1.0),
        Surrogate("piecewise_exp", 3, 1.0),
        Surrogate("soft_sign", 4, 2.0),
        Surrogate("super_spike", 5, 1.0),
        Surrogate("erf", 6, 2.0),
        Surrogate("rect", 7, 1.0),
    )
}


def resolve(surrogate: str, alpha: float | None) -> tuple[Surrogate, float]:
    """Validate a surrogate name and fill in its default alpha."""
    if not isinstance(surrogate, str) or surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {', '.join(SURROGATES)}")
    s = SURROGATES[surrogate]
    if alpha is None:
        alpha = s.default_alpha
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"surrogate alpha must be a positive finite number, got {alpha}")
    return s, alpha


def derivative(name: str, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """sigma'(x): the surrogate derivative of each named surrogate, in closed form."""
    a = alpha
    if name == "sigmoid":
        s = torch.sigmoid(a * x)
        return a * s * (1 - s)
    if name == "atan":
        return (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)
    if name == "piecewise_quadratic":
        return torch.clamp(a - a * a * x.abs(), min=0)
    if name == "piecewise_exp":
        return (a / 2) * torch.exp(-a * x.abs())
    if name == "soft_sign":
        return 1 / (2 * a * (1 / a + x.abs()) ** 2)
    if name == "super_spike":
        return a / (1 + x.abs()) ** 2
    if name == "erf":
        return (a / math.sqrt(math.pi)) * torch.exp(-((a * x) ** 2))
    if name == "rect":
        return (x.abs() < a / 2).to(x.dtype) / a
    raise ValueError(f"unknown surrogate {name!r}")


def primitive(name: str, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """A smooth g with g' = sigma' (used by the finite-difference gradient checks only)."""
    a = alpha
    if name == "sigmoid":
        return torch.sigmoid(a * x)
    if name == "atan":
        return 0.5 + torch.atan(math.pi / 2 * a * x) / math.pi
    if name == "piecewise_quadratic":
        inner = -0.5 * a * a * x * x.abs() + a * x + 0.5
        return torch.where(x < -1 / a, torch.zeros_like(x), torch.where(x > 1 / a, torch.ones_like(x), inner))
    if name == "piecewise_exp":
        return torch.where(x < 0, 0.5 * torch.exp(a * x), 1 - 0.5 * torch.exp(-a * x))
    if name == "soft_sign":
        return 0.5 * (a * x / (1 + a * x.abs()) + 1)
    if name == "super_spike":
        return a * x / (1 + x.abs())
    if name == "erf":
        return 0.5 * (1 + torch.erf(a * x))
    if name == "rect":
        return torch.clamp(x / a + 0.5, 0, 1)
    raise ValueError(f"unknown surrogate {name!r}")


class _HeavisideWithSurrogate(torch.autograd.Function):
    """Forward: Heaviside(x) (fires at x >= 0). Backward: the surrogate derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.name, ctx.alpha = name, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * derivative(ctx.name, x, ctx.alpha), None, None


def heaviside(x: torch.Tensor, name: str = "sigmoid", alpha: float | None = None) -> torch.Tensor:
    """Spike function with a surrogate gradient, for code outside the fused LIF (e.g. custom neurons)."""
    s, a = resolve(name, alpha)
    return _HeavisideWithSurrogate.apply(x, s.name, a)
