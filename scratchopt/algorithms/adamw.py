r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101).

The update is :func:`scratchopt.algorithms.adam.update` with ``decoupled_weight_decay=True``: the parameter is
shrunk first, θ ← θ·(1 − γ·λ), and the decay never enters the moments m and v. Symbols, arguments and
state keys are those of :mod:`scratchopt.algorithms.adam`; only the default λ differs (``weight_decay=1e-2``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from scratchopt.algorithms.adam import Adam


class AdamW(Adam):
    __doc__ = __doc__
    torch_twin = "AdamW"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: str | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            impl=impl,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
