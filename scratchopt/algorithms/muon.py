r"""Muon: momentum orthogonalized by Newton–Schulz, for the 2-d weight matrices of hidden layers (Jordan
et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/; the ``match_rms_adamw`` scaling from Liu et al., "Muon is
Scalable for LLM Training", 2025, https://arxiv.org/abs/2502.16982).

Step t, for a matrix parameter θ (A × B) with gradient G::

    B   ← B + (1 − μ)·(G − B)                     momentum (lerp: μ·B + (1 − μ)·G)
    M   = G + μ·(B − G)                           if nesterov (lerp: (1 − μ)·G + μ·B)
    M   = B                                       otherwise
    X   = bfloat16(M), transposed if A > B        so that X is wide
    X   ← X / max(‖X‖_F, ε)                       spectral norm ≤ 1
    X   ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X              k times (quintic Newton–Schulz), in bfloat16
    O   = X, transposed back if A > B             ≈ U·Vᵀ of M = U·S·Vᵀ, singular values near 1
    θ   ← θ·(1 − γ·λ)                             decoupled weight decay
    θ   ← θ − γ·r·O                               r = √max(1, A/B) (``original``, the default)
                                                  r = 0.2·√max(A, B) (``match_rms_adamw``)

=========  ===============================  =====================
symbol     argument                         state key
=========  ===============================  =====================
θ          params (2-d only)
G          ``param.grad``
γ          ``lr``
λ          ``weight_decay``
μ          ``momentum``
—          ``nesterov``
a, b, c    ``ns_coefficients``
ε          ``eps``
k          ``ns_steps``
r          ``adjust_lr_fn``
B          —                                ``momentum_buffer``
M, X, O    —                                — (temporaries)
=========  ===============================  =====================

Not elementwise: Newton–Schulz multiplies whole matrices, so every ``impl`` runs this update once per
tensor. There is no ``step`` in the state. As in torch, a bfloat16 parameter without Nesterov has its
momentum buffer normalised in place by the step X ← X/max(‖X‖_F, ε) (``bfloat16()`` of a bfloat16
tensor is that tensor, not a copy); every other combination leaves the buffer as the first line sets it.

Deliberate differences from Jordan et al.'s post, all torch's: the momentum buffer is an exponential
average, B ← μB + (1 − μ)G, where the post accumulates B ← μB + G (the scale does not survive the
normalisation before Newton–Schulz, but it changes how a new gradient weighs against the buffer); the
Nesterov form is the lerp G + μ(B − G) rather than G + μB; the learning rate is scaled by r, a choice
between the post's √max(1, A/B) and Liu et al.'s 0.2·√max(A, B); the weight decay is decoupled and
multiplied by γ (Liu et al.'s form; the post has none). Only 2-d parameters are accepted (checked at
construction, as torch does); the post's flattening of convolution filters is left to the caller.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_one_element_lr, require_should_be
from scratchopt.ops import zeros_like
from scratchopt.optimizer import ScratchOptimizer

#: Jordan et al.'s quintic coefficients (a, b, c): the largest slope at zero that still converges.
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def orthogonalize(matrix: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """k quintic Newton–Schulz iterations in bfloat16: ≈ U·Vᵀ for matrix = U·S·Vᵀ."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if matrix.dim() != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.bfloat16()
    if tall:
        x = x.T  # XXᵀ is then the smaller Gram matrix
    x.div_(x.norm().clamp(min=eps))  # X ← X/max(‖X‖_F, ε)
    for _ in range(steps):
        gram = x @ x.T  # XXᵀ
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·XXᵀ + c·(XXᵀ)²
        x = torch.addmm(x, polynomial, x, beta=a)  # a·X + (…)·X
    return x.T if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """r: √max(1, A/B) for ``original`` (and None), 0.2·√max(A, B) for ``match_rms_adamw``."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    lr: Any,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
) -> None:
    if grad.dim() != 2:
        raise ValueError("Param gradient must be a 2D matrix")
    momentum_buffer.lerp_(grad, 1 - momentum)  # B ← B + (1 − μ)(G − B)
    direction = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer  # M
    direction = orthogonalize(direction, ns_coefficients, ns_steps, eps)  # O
    param.mul_(1 - lr * weight_decay)  # θ ← θ(1 − γλ)
    param.add_(direction, alpha=-(lr * lr_ratio(adjust_lr_fn, param.shape)))  # θ ← θ − γrO


class Muon(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("momentum_buffer",)
    hyperparameter_keys = (
        "lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "ns_coefficients",
        "eps",
        "ns_steps",
        "adjust_lr_fn",
    )
    scalar_state_keys = ()
    sparse_error = "Muon does not support sparse gradients"
    update = staticmethod(update)
    elementwise = False
    torch_twin = "Muon"
    takes = "matrices"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        check_one_element_lr(lr)
        require_should_be(0.0 <= lr, "Learning rate", ">= 0", lr, "lr")
        require_should_be(0.0 <= momentum, "momentum", ">= 0", momentum, "momentum")
        require_should_be(0.0 <= weight_decay, "weight decay", ">= 0", weight_decay, "weight_decay")
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(
                f"Adjust learning rate function {adjust_lr_fn} is not supported "
                f"(allowed: None, {', '.join(map(repr, ADJUST_LR_FNS))})"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults, impl)
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with size: "
                        f"{param.size()}; optimize the others (biases, embeddings …) with another optimizer"
                    )

    def check_grad(self, param: Tensor) -> None:
        if param.is_complex():  # torch checks this before the layout of the gradient
            raise RuntimeError("Muon does not support complex parameters")
        super().check_grad(param)

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        assert param.grad is not None  # the first step of a param with a gradient creates its state
        return {"momentum_buffer": zeros_like(param.grad)}
