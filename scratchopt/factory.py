"""``scratchopt.create``: the usual optimizer set-up for a model in one call.

What nanoGPT's ``configure_optimizers`` and timm's ``create_optimizer_v2`` do by hand: the trainable
params in two groups, weight decay on the weight matrices only (never on biases, normalisation weights
or embeddings, where decay pulls towards a zero that has no meaning), each param named, and any
registered algorithm by name::

    optimizer = scratchopt.create(model, "adamw", lr=3e-4, weight_decay=0.1, impl="fused")

is ``scratchopt.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": the_rest, "weight_decay":
0.0}], lr=3e-4, impl="fused")`` with ``(name, param)`` pairs, so the groups and the state_dict carry
``param_names``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from scratchopt.algorithms import ALGORITHMS

#: Modules whose weights are never decayed: normalisations (their weight is a per-feature gain) and
#: embeddings (a lookup table, not a map).
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)


def create(
    model: nn.Module,
    name: str,
    *,
    weight_decay: float | None = None,
    no_decay: Callable[[str, nn.Parameter, nn.Module], bool] | None = None,
    **kwargs: Any,
) -> Any:
    """An optimizer of the registered algorithm ``name`` (any case: ``"adamw"``, ``"SGD"``) over the
    trainable params of ``model``, the keyword arguments passed on (``lr``, ``impl``, ...).

    Where the algorithm takes ``weight_decay``, the params are split into two groups: those decayed
    (``weight_decay``, or the algorithm's default when None) and those not (``weight_decay=0``):
    params of fewer than two dimensions (biases, gains), the params of normalisation and embedding
    modules (:data:`NO_DECAY_MODULES`), and the names a model's ``no_weight_decay()`` returns (timm's
    convention). ``no_decay(name, param, module)`` replaces that rule. Frozen params are left out; a
    param shared by two modules is listed once.
    """
    cls = _algorithm(name)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"create: {type(model).__name__} has no trainable parameters")
    if getattr(cls, "takes", "any") == "matrices" and any(p.dim() != 2 for _, p in named):
        not_matrices = [n for n, p in named if p.dim() != 2]
        listed = ", ".join(not_matrices[:4]) + (", …" if len(not_matrices) > 4 else "")
        raise ValueError(
            f"create: {cls.__name__} takes 2-d weight matrices only, and {type(model).__name__} has others "
            f"({listed}); build it over the matrices and "
            "another optimizer (AdamW, say) over the rest"
        )
    if "weight_decay" not in inspect.signature(cls).parameters:
        if weight_decay is not None:
            raise TypeError(f"create: {cls.__name__} takes no weight_decay")
        return cls(named, **kwargs)
    rule = no_decay or _default_rule(model)
    owners = _owners(model)
    decayed = [(n, p) for n, p in named if not rule(n, p, owners[n])]
    others = [(n, p) for n, p in named if rule(n, p, owners[n])]
    decay = inspect.signature(cls).parameters["weight_decay"].default if weight_decay is None else weight_decay
    groups = [
        group
        for group in ({"params": decayed, "weight_decay": decay}, {"params": others, "weight_decay": 0.0})
        if group["params"]
    ]
    return cls(groups, **kwargs)


def _algorithm(name: str) -> Any:
    by_lower = {key.lower(): cls for key, cls in ALGORITHMS.items()}
    found = by_lower.get(name.lower())
    if found is None:
        raise ValueError(f"create: no algorithm called {name!r}; the registered ones are {', '.join(ALGORITHMS)}")
    return found


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Each param's name and the module that holds it (the first, for a shared param)."""
    owners: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{module_name}.{param_name}" if module_name else param_name, module)
    return owners


def _default_rule(model: nn.Module) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    listed = getattr(model, "no_weight_decay", None)
    names = set(listed()) if callable(listed) else set()

    def rule(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return param.dim() < 2 or isinstance(module, NO_DECAY_MODULES) or name in names

    return rule
