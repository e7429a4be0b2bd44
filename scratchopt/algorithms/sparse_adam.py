r"""SparseAdam: Adam restricted to the entries a sparse gradient names (Kingma & Ba, "Adam: A Method for
Stochastic Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980, masked as torch masks it).

Step t (1-based) of parameter θ, for a sparse gradient g (``nn.Embedding(sparse=True)`` produces them);
every line acts only on the set I of indices g names, after g is coalesced (its repeated indices summed)::

    g     ← −g                                        if maximize
    m_I   ← m_I + (1 − β₁)·(g_I − m_I)
    v_I   ← v_I + (1 − β₂)·(g_I² − v_I)
    θ_I   ← θ_I − γ·√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m_I / (√v_I + ε)

Entries outside I keep their moments and their value: neither decays on a step that does not name them.
A gradient with no entries still counts its step.

=========  ================================  =========================================
symbol     argument                          state key
=========  ================================  =========================================
θ          params (dense, real)
g          ``param.grad`` (sparse COO only)
γ          ``lr``
β₁, β₂     ``betas``
ε          ``eps``
t          —                                 ``step`` (a Python int, as torch keeps it)
m          —                                 ``exp_avg`` (dense, like θ)
v          —                                 ``exp_avg_sq`` (dense, like θ)
=========  ================================  =========================================

Not elementwise in the sense of ``impl``: the gradient is sparse, so every ``impl`` runs this update once
per tensor.

Deliberate differences from the paper, all torch's: the moments and the parameter move only at the
indices the gradient names (the "lazy" Adam of embedding tables); the new m_I and v_I used in the step
are recomputed as (update + old value) from the gathered old values rather than read back from the state;
ε is added to √v_I before the bias correction, which is folded into the step size. Dense gradients are
refused (use :class:`scratchopt.Adam`), as are sparse and complex parameters.

One difference from torch that only shows when a step is refused: a dense gradient is found before any
parameter of the group gets its state, while torch has by then created the state of the parameters before
it in the group and counted their step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from scratchopt.checks import check_betas, check_one_element_lr, require
from scratchopt.ops import zeros_like
from scratchopt.optimizer import ScratchOptimizer


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: Any,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
) -> None:
    if maximize:
        grad = -grad  # g ← −g
    grad = grad.coalesce()  # unique indices: the update is non-linear in g
    indices, grad_values = grad._indices(), grad._values()
    if grad_values.numel() == 0:
        return

    def at_indices(values: Tensor) -> Tensor:
        """A sparse tensor holding ``values`` at g's indices (flagged uncoalesced, as torch builds it).

        The indices are those of a coalesced tensor, so they need no invariant check.
        """
        return torch.sparse_coo_tensor(indices, values, grad.size(), check_invariants=False)

    old_exp_avg = exp_avg.sparse_mask(grad)._values()  # m_I
    exp_avg_step = grad_values.sub(old_exp_avg).mul_(1 - beta1)  # (1 − β₁)(g_I − m_I)
    exp_avg.add_(at_indices(exp_avg_step))  # m_I ← m_I + (1 − β₁)(g_I − m_I)
    old_exp_avg_sq = exp_avg_sq.sparse_mask(grad)._values()  # v_I
    exp_avg_sq_step = grad_values.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)  # (1 − β₂)(g_I² − v_I)
    exp_avg_sq.add_(at_indices(exp_avg_sq_step))  # v_I ← v_I + (1 − β₂)(g_I² − v_I)
    numerator = exp_avg_step.add_(old_exp_avg)  # new m_I, without reading it back
    denominator = exp_avg_sq_step.add_(old_exp_avg_sq).sqrt_().add_(eps)  # √(new v_I) + ε
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)  # γ√(1 − β₂ᵗ)/(1 − β₁ᵗ)
    param.add_(at_indices(-step_size * numerator.div_(denominator)))  # θ_I ← θ_I − step·m_I/(√v_I + ε)


class SparseAdam(ScratchOptimizer):
    __doc__ = __doc__
    state_keys = ("exp_avg", "exp_avg_sq")
    hyperparameter_keys = ("lr", "betas", "eps", "maximize")
    split_keys = {"betas": ("beta1", "beta2")}
    scalar_state_keys = ()  # torch keeps ``step`` a Python int here
    update = staticmethod(update)
    elementwise = False
    torch_twin = "SparseAdam"
    takes = "sparse gradients"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        impl: str | None = None,
    ) -> None:
        check_one_element_lr(lr)
        require(0.0 < lr, "learning rate", lr, "lr > 0")
        require(0.0 < eps, "epsilon value", eps, "eps > 0")
        check_betas(betas)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        super().__init__(params, defaults, impl)
        positions = [
            (group_index, param_index, param)
            for group_index, group in enumerate(self.param_groups)
            for param_index, param in enumerate(group["params"])
        ]
        sparse = [[g, i] for g, i, param in positions if param.is_sparse]
        if sparse:
            raise ValueError(f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors")
        complex_ = [[g, i] for g, i, param in positions if param.is_complex()]
        if complex_:
            raise ValueError(f"Complex params at indices {complex_}: SparseAdam does not support complex parameters")

    def check_grad(self, param: Tensor) -> None:
        assert param.grad is not None  # check_inputs is given the params with a gradient only
        if not param.grad.is_sparse:
            raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"step": 0, "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}
