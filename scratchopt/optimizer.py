"""The base classes of every scratchopt algorithm, and the protocol for writing your own.

:class:`ScratchOptimizer` is an algorithm whose step is one ``update`` per parameter, run by the
strategies (``impl=``); :class:`ClosureOptimizer` is one whose step needs a closure and is written out in
full (LBFGS, Newton, NesterovLookahead). Both are real :class:`torch.optim.Optimizer` subclasses and
both derive from :class:`Algorithm`, which holds what the tools need to know about an algorithm
(``torch_twin``, ``needs_closure``, ``takes``, ``example_kwargs``, ``elementwise``): declared once on the
class, read by the registry (:mod:`scratchopt.algorithms`), the test kit, the benchmark and the report.

An algorithm says what its math is and nothing about how it is executed. A subclass of
:class:`ScratchOptimizer` supplies:

``update(param, grad, *state_tensors, **arguments)`` (a static method)
    The math of one step, written once with Tensor methods (``add_``, ``mul_``, ``lerp_``, ``addcmul_``,
    ``addcdiv_``, ``sqrt`` …) and Python arithmetic on the scalar arguments. A strategy hands it one
    tensor (``impl="loop"``), lists of tensors (``"foreach"``) or stand-ins it compiles into a kernel
    (``"compiled"``, ``"fused"``), so it must not read tensor data
    into Python (no ``.item()``, no ``if (x > 0).any()``).
``state_keys``
    The names of the per-parameter state tensors, in the order ``update`` takes them (None is passed
    for a key a parameter's state does not have, such as ``max_exp_avg_sq`` without AMSGrad).
``init_state(param, group)``
    The state of a parameter at its first step, keyed as torch keys it: the state tensors and the
    per-parameter scalars such as ``step`` (:func:`new_step_counter`).
``hyperparameter_keys`` and ``split_keys``
    Which group keys become keyword arguments of ``update`` (read afresh at every step, so schedulers
    and edited ``param_groups`` take effect): by the same name, or split (``{"betas": ("beta1",
    "beta2")}``). Override :meth:`ScratchOptimizer.update_arguments` for anything else.
``count_step(param, group)`` (optional)
    The per-parameter bookkeeping of a step and the per-parameter scalars ``update`` takes. The default
    counts ``state["step"]`` and passes it as ``step`` (``fused`` does that natively); NAdam also
    advances its μ product here.
``elementwise``
    True when ``update`` treats every element independently (no reductions, no reshapes, no mixing of
    elements), so it may run on lists, concatenated buffers and compiled kernels. False (the default)
    runs the per-tensor loop under every ``impl``, and ``optimizer.impl`` then says ``"loop"``.
``sparse_error``, ``group_defaults``, ``scalar_state_keys``
    torch's error for a sparse gradient (None where sparse gradients are taken), the group keys torch's
    ``__setstate__`` fills in (besides torch's implementation flags, which the base class supplies), and
    the 0-d state an older torch saved as Python numbers.

torch's implementation flags (``foreach``, ``fused``, ``capturable``, ``differentiable``) are passed to
``ScratchOptimizer.__init__`` as keywords, only those the torch twin's signature has: the base class
puts them in the defaults (so the groups hold torch's keys), maps them onto strategies and refuses the
combinations torch refuses.

The validators in :mod:`scratchopt.checks` raise torch's exception types with messages naming the
argument and its range; :mod:`scratchopt.ops` has the few helpers an ``update`` may need besides Tensor
methods. :class:`ScratchOptimizer` (a real :class:`torch.optim.Optimizer`) owns the rest: which params
take part in a step, the checks made before anything changes, the closure, hooks, ``state_dict`` and
the strategy chosen with ``impl=``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from scratchopt import precision, strategies
from scratchopt.checks import require_closure
from scratchopt.ops import count_counters
from scratchopt.step_checks import check_gradients_match, check_state_keys, check_state_matches
from scratchopt.strategies.kernels.recording import non_elementwise_operation

#: torch's implementation flags and the value its ``__setstate__`` fills in for each.
TORCH_FLAGS: dict[str, Any] = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}


def scalar_dtype(fused: bool | None = False) -> torch.dtype:
    """The dtype torch gives the ``step`` counter: float32, or float64 under a float64 default dtype."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step_counter(param: Tensor, group: dict[str, Any]) -> Tensor:
    """A zero ``step`` placed as torch places it: on the CPU unless capturable or fused."""
    if group.get("capturable") or group.get("fused"):
        return torch.zeros((), dtype=scalar_dtype(group.get("fused")), device=param.device)
    return torch.tensor(0.0, dtype=scalar_dtype())


def shared_arguments(arguments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Equal per-parameter argument dicts as one shared dict: a strategy then sees with an identity check
    that the params agree (the steady state: one tape, one kernel call)."""
    first = arguments[0] if arguments else None
    if all(a == first for a in arguments):
        return [first] * len(arguments)  # type: ignore[list-item]
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    return [seen.setdefault(tuple(a.items()), a) for a in arguments]


def squeeze_scalar(value: Any) -> Any:
    """A 1-element tensor hyperparameter becomes 0-d, as torch does before its arithmetic."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


def resolve_impl(impl: str | None, foreach: bool | None, fused: bool | None) -> str:
    """Map ``impl=`` and torch's ``foreach=``/``fused=`` flags onto one strategy name."""
    if impl is not None and impl not in strategies.NAMES:
        raise ValueError(f"Invalid impl value: {impl!r}; impl must be one of {', '.join(strategies.NAMES)}")
    implied = "fused" if fused else "foreach" if foreach else None
    if impl is None:
        return implied or "loop"
    if implied is not None and implied != impl:
        raise ValueError(f"impl={impl!r} contradicts {'fused' if fused else 'foreach'}=True; pass one or the other")
    return impl


def only_the_loop(name: str, impl: str) -> str:
    """The error for an ``impl`` other than the loop asked of an algorithm that runs only the loop."""
    return (
        f"{name} runs only impl='loop' (got impl={impl!r}): its update is not elementwise (it reduces over, "
        "reshapes or mixes a tensor's elements, or evaluates a closure), so it does not run on tensor "
        "lists or generated kernels. torch's foreach=/fused= flags, where torch's signature has them, are "
        "accepted and run the loop"
    )


def check_impl(optimizer: Optimizer, impl: Any) -> str:
    """``impl`` if the optimizer can run it, else the ValueError every algorithm raises."""
    if impl not in strategies.STRATEGIES:
        raise ValueError(f"Invalid impl value: {impl!r}; impl must be one of {', '.join(strategies.NAMES)}")
    if impl != "loop" and not getattr(optimizer, "elementwise", False):
        raise ValueError(only_the_loop(type(optimizer).__name__, impl))
    return str(impl)


def _forget_strategy_data(optimizer: Optimizer) -> None:
    """After ``load_state_dict`` the state tensors are new: a strategy forgets what it kept for the old."""
    if isinstance(optimizer, ScratchOptimizer):
        strategies.reset(optimizer)
        # torch casts the loaded state to each parameter's dtype: a low-precision group keeps its own.
        for group in optimizer.param_groups:
            if precision.is_low(group):
                for param in group["params"]:
                    state = optimizer.state.get(param)
                    if state:
                        dtype = precision.state_dtype_for(param, group)
                        precision.cast_state(state, optimizer.state_keys, param, dtype, optimizer)


def _with_group_steps(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state_dict that also says each group's ``step`` (the most steps of its params), as a reference
    package that counts per group keeps it, so that the package resumes from it."""
    for group in state_dict["param_groups"]:
        steps = [
            float(state_dict["state"][i]["step"])
            for i in group["params"]
            if i in state_dict["state"] and "step" in state_dict["state"][i]
        ]
        group["step"] = int(max(steps)) if steps else 0
    return state_dict


def _with_param_steps(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """A state_dict from a package that counts per group (no param's state has a ``step``): each param's
    state takes its group's. One of ours that lacks a param's ``step`` is left to the step's checks."""
    if any("step" in state for state in state_dict["state"].values()):
        return state_dict
    for group in state_dict["param_groups"]:
        if "step" not in group:
            continue
        for i in group["params"]:
            state = state_dict["state"].get(i)
            if state and "step" not in state:
                state["step"] = torch.tensor(float(group["step"]), dtype=scalar_dtype())
    return state_dict


def _register_hooks(optimizer: ScratchOptimizer) -> None:
    # Once per object: torch's load_state_dict calls __setstate__ on an optimizer that has them already.
    if optimizer.__dict__.get("_hooks_registered"):
        return
    optimizer.__dict__["_hooks_registered"] = True
    # torch's load_state_dict replaces the state tensors: a strategy forgets what it kept for them.
    optimizer.register_load_state_dict_post_hook(_forget_strategy_data)
    if optimizer.reference_counts_per_group:
        optimizer.register_state_dict_post_hook(_with_group_steps)
        optimizer.register_load_state_dict_pre_hook(_with_param_steps)


def _flags_of(cls: type) -> frozenset[str]:
    """torch's implementation flags the class's constructor takes (those its groups hold)."""
    return frozenset(TORCH_FLAGS) & set(inspect.signature(cls).parameters)


@functools.cache
def torch_key_order(twin: str) -> tuple[str, ...]:
    """The order of the group keys of ``torch.optim.<twin>``, read from one built on a probe parameter."""
    probe = torch.zeros(2, 2, requires_grad=True)
    return tuple(getattr(torch.optim, twin)([probe]).defaults)


def runs_eagerly(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` as ``torch.compile`` runs it: eagerly, with the same numbers as outside a compiled region.

    A strategy reads ``optimizer.state`` afresh, keeps tables and calls native kernels: nothing Dynamo
    can trace. ``torch.compile(opt.step)`` and a compiled training step that calls ``opt.step()`` then run
    the step as a call out of the graph (one graph break), instead of tracing its bookkeeping into a
    graph that does part of it (a step counted but not applied). Every algorithm's class has its ``step``
    wrapped when its first optimizer is built, after torch's hooks (a user's own algorithm included).
    """
    eager = torch.compiler.disable(step, reason="a scratchopt step runs eagerly")

    # Outside a compiled region the step is called directly (the disabled wrapper costs microseconds per
    # call); Dynamo, tracing this function, sees is_compiling() as True and calls out to the eager step.
    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        return step(*args, **kwargs)

    wrapper.runs_eagerly = True  # type: ignore[attr-defined]
    return wrapper


class Algorithm(Optimizer):
    """What the tools need to know about an algorithm, declared once on its class.

    The registry (:mod:`scratchopt.algorithms`) lists every subclass defined there; the test kit, the
    demo, the benchmark and the report read these declarations instead of keeping lists of names.
    """

    #: The ``torch.optim`` class this algorithm reproduces bit for bit, by name; None for none.
    torch_twin: ClassVar[str | None] = None
    #: The reference implementation it is proven against, outside torch, as ``"module:Class"`` (a test
    #: dependency only: the benchmark runs it beside ours where it is installed).
    reference_class: ClassVar[str | None] = None
    #: ``step`` requires a closure.
    needs_closure: ClassVar[bool] = False
    #: The params and gradients it accepts: any dense ones, matrices only, or sparse gradients only.
    takes: ClassVar[Literal["any", "matrices", "sparse gradients"]] = "any"
    #: True when its update treats every element independently, so every strategy may run it.
    elementwise: ClassVar[bool] = False
    #: Arguments for the demo, benchmark and report rows, beside the params: those without a default
    #: and those that make a short run meaningful (torch's defaults otherwise).
    example_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        # After torch wrapped the class's step with its hooks: the whole of it runs eagerly.
        cls = type(self)
        if not getattr(cls.step, "runs_eagerly", False):
            cls.step = runs_eagerly(cls.step)  # type: ignore[method-assign]


def _with_precision_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """A constructor that also takes ``state_dtype`` and ``stochastic_rounding`` (keyword-only), for every
    algorithm at once: they are set aside for :class:`ScratchOptimizer`'s ``__init__``, which puts them in
    the defaults (:mod:`scratchopt.precision`)."""

    own = set(inspect.signature(init).parameters)

    @functools.wraps(init)
    def __init__(self: ScratchOptimizer, *args: Any, **kwargs: Any) -> None:
        # A constructor that names the setting itself receives it (and passes it on to its parent's).
        given = {key: kwargs[key] if key in own else kwargs.pop(key) for key in precision.DEFAULTS if key in kwargs}
        outermost = "_precision_arguments" not in self.__dict__
        if outermost or given:  # a subclass's constructor calling its parent's passes them on
            self.__dict__["_precision_arguments"] = {**precision.DEFAULTS, **given}
        try:
            init(self, *args, **kwargs)
        finally:
            if outermost:
                self.__dict__.pop("_precision_arguments", None)

    signature = inspect.signature(init)
    extra = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=precision.ANNOTATIONS[key])
        for key, value in precision.DEFAULTS.items()
        if key not in signature.parameters
    ]
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind == inspect.Parameter.VAR_KEYWORD), len(parameters))
    __init__.__signature__ = signature.replace(parameters=parameters[:at] + extra + parameters[at:])  # type: ignore[attr-defined]
    __init__.takes_precision = True  # type: ignore[attr-defined]
    return __init__


class ScratchOptimizer(Algorithm):
    """A :class:`torch.optim.Optimizer` whose subclasses define only the math of one algorithm."""

    state_keys: ClassVar[tuple[str, ...]] = ()
    #: Group keys whose values ``update`` takes as keyword arguments, by the same name unless split.
    hyperparameter_keys: ClassVar[tuple[str, ...]] = ()
    #: Group keys holding a tuple that ``update`` takes as separate arguments: ``{"betas": ("beta1",
    #: "beta2")}`` passes ``group["betas"][0]`` as ``beta1`` and ``group["betas"][1]`` as ``beta2``.
    split_keys: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Group keys torch fills in when it loads a state_dict saved by an older version (``__setstate__``),
    #: besides torch's implementation flags (:data:`TORCH_FLAGS`), which the base class fills in.
    group_defaults: ClassVar[dict[str, Any]] = {}
    #: 0-d state tensors an older version saved as Python numbers.
    scalar_state_keys: ClassVar[tuple[str, ...]] = ("step",)
    #: State keys that never hold a negative value (second moments): with ``state_dtype="8bit"`` they take
    #: the unsigned dynamic map, one more bit of fraction (:mod:`scratchopt.quantization`).
    nonnegative_state: ClassVar[frozenset[str]] = frozenset()
    #: State keys that hold an iterate of the weights (Schedule-Free's z): kept in float32 under
    #: ``state_dtype="8bit"``, which would move the weights by its quantisation error.
    weight_like_state: ClassVar[frozenset[str]] = frozenset()
    #: torch's error for a sparse gradient, or None where the algorithm accepts sparse gradients.
    sparse_error: ClassVar[str | None] = None
    update: ClassVar[Callable[..., None]]
    #: The reference package keeps ``step`` per param group where this one keeps it per param (Adan,
    #: AdEMAMix): the state_dict also says each group's step, and a state_dict of the package's is
    #: read with each param taking its group's, so that a run moves between the two.
    reference_counts_per_group: ClassVar[bool] = False
    #: The keyword arguments of ``update`` that :meth:`reduce` computes (the elementwise check runs the
    #: update with 1.0 for each).
    reduced_arguments: ClassVar[tuple[str, ...]] = ()
    #: False while ``__init__`` runs: the groups are checked once the subclass's own set-up is done.
    _constructed: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__ and not getattr(cls.__init__, "takes_precision", False):
            cls.__init__ = _with_precision_arguments(cls.__init__)  # type: ignore[method-assign]

    def __init__(
        self, params: Any, defaults: dict[str, Any], impl: str | None = None, **torch_flags: bool | None
    ) -> None:
        chosen = self.__dict__.get("_precision_arguments", precision.DEFAULTS)
        precision.check(type(self).__name__, self.elementwise, chosen["state_dtype"], chosen["stochastic_rounding"])
        if self.elementwise:
            defaults = {**defaults, **chosen}
        unknown = set(torch_flags) - set(TORCH_FLAGS)
        if unknown:
            raise TypeError(f"unknown implementation flags {sorted(unknown)}; torch's are {list(TORCH_FLAGS)}")
        if torch_flags.get("fused"):
            if torch_flags.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if torch_flags.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if torch_flags.get("differentiable"):
            # torch's differentiable path detaches and clones in algorithm-specific places; running our
            # update under autograd would give gradients that differ from torch's, so we refuse it.
            raise NotImplementedError("differentiable=True is not supported by scratchopt; use torch.optim")
        if impl is not None:
            check_impl(self, impl)
        resolved = resolve_impl(impl, torch_flags.get("foreach"), torch_flags.get("fused"))
        #: The strategy of a group that names none (torch's flags are hints: a non-elementwise
        #: algorithm runs the loop under them); each group records its own as ``group["impl"]``.
        self.default_impl = resolved if self.elementwise else "loop"
        self._constructed = False
        # fused=True where torch has the flag, so that torch.optim loading this state_dict runs fused too.
        # (foreach= is left as given: torch's foreach refuses inputs ours takes, a tensor lr for one.)
        fused = {"fused": True} if self.default_impl == "fused" and "fused" in torch_flags else {}
        merged = {**defaults, **torch_flags, **fused}
        merged["impl"] = self.default_impl
        if self.torch_twin is not None:  # torch interleaves its flags with the hyperparameters
            order = torch_key_order(self.torch_twin)
            merged = dict(
                sorted(merged.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
            )
        super().__init__(params, merged)
        _register_hooks(self)
        self._constructed = True
        for group in self.param_groups:
            self._check_elementwise_declaration(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        impl = param_group.get("impl") if isinstance(param_group, dict) else None
        if impl is not None:
            check_impl(self, impl)
        if isinstance(param_group, dict) and (set(precision.DEFAULTS) & set(param_group)):
            precision.check(
                type(self).__name__,
                self.elementwise,
                param_group.get("state_dtype", torch.float32),
                param_group.get("stochastic_rounding", False),
            )
        super().add_param_group(param_group)
        if self._constructed:
            self._check_elementwise_declaration(self.param_groups[-1])

    @property
    def impl(self) -> str:
        """The strategy that runs the first group (each group's is :meth:`impl_of`)."""
        groups = getattr(self, "param_groups", None)
        return self.impl_of(groups[0]) if groups else self.default_impl

    def impl_of(self, group: dict[str, Any]) -> str:
        """The strategy that runs a group: its ``impl``, read at every step (so an edit takes effect on
        the next one); for a group loaded from torch's state_dict, which has none, the one torch's
        ``fused``/``foreach`` flags select, else :attr:`default_impl`. The loop for an algorithm that is
        not elementwise."""
        if not self.elementwise:
            return "loop"
        impl = group.get("impl")
        if impl is None:
            impl = "fused" if group.get("fused") else "foreach" if group.get("foreach") else self.default_impl
        return check_impl(self, impl)

    def _check_elementwise_declaration(self, group: dict[str, Any]) -> None:
        """Run ``update`` on stand-ins, as its first step would run, and refuse a false declaration.

        A reduction or a reshape on a buffer that concatenates many tensors, or on a tensor viewed as 1-d,
        gives silently wrong numbers; so ``elementwise = True`` is checked for every group, before any
        step, and the compiled strategies check every new program again.
        """
        if not self.elementwise or not group["params"]:
            return
        first = group["params"][0]
        # A real probe for a complex param: the operations are the same, and complex scalars (a tensor
        # beta cast like a complex param) cannot be followed by the stand-ins.
        # On a meta-device model (built before its memory exists) the probe lives on the CPU: its step
        # counter is read as a number below.
        device = torch.device("cpu") if first.device.type == "meta" else first.device
        probe = torch.zeros(2, dtype=first.dtype.to_real(), device=device)
        probe.grad = torch.zeros_like(probe)
        arguments = self.count_step(probe, group)
        state = self.state.pop(probe, {})
        tensors = [probe, probe.grad, *[state.get(key) for key in self.state_keys]]
        scalars = {
            **self.update_arguments(group),
            **dict.fromkeys(self.reduced_arguments, 1.0),
            **{k: v.item() if isinstance(v, Tensor) else v for k, v in arguments.items()},
        }
        operation = non_elementwise_operation(self.update, tensors, scalars)
        if operation is not None:
            raise TypeError(
                f"{type(self).__name__} declares elementwise = True, but its update {operation}: not "
                "elementwise (it may reduce, reshape, mix elements or read tensor data); declare "
                "elementwise = False to run it per tensor under every impl"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with the state and groups only: what the optimizer holds
        # besides them stays. An unpickled one takes its own (an older pickle named it impl).
        if "impl" in state:
            state.setdefault("default_impl", state.pop("impl"))
        if "default_impl" not in state and not hasattr(self, "default_impl"):
            state["default_impl"] = "loop"
        super().__setstate__(state)
        _register_hooks(self)
        group_defaults = {
            **{flag: value for flag, value in TORCH_FLAGS.items() if flag in _flags_of(type(self))},
            # a state_dict without them (torch.optim's) keeps the constructor's precision
            **(
                {k: getattr(self, "defaults", {}).get(k, v) for k, v in precision.DEFAULTS.items()}
                if self.elementwise
                else {}
            ),
            **self.group_defaults,
        }
        for group in self.param_groups:
            for key, value in group_defaults.items():
                group.setdefault(key, value)
            for param in group["params"]:
                param_state = self.state.get(param, {})
                for key in self.scalar_state_keys:
                    if key in param_state and not torch.is_tensor(param_state[key]):
                        param_state[key] = new_step_counter(param, group).fill_(float(param_state[key]))

    def update_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``update`` that come from the param group, read afresh at every step.

        A 1-element tensor hyperparameter is squeezed to 0-d and otherwise passed as it is (not as a
        Python number), because torch's arithmetic with it happens in the tensor's dtype.
        """
        values: dict[str, Any] = {}
        for key in self.hyperparameter_keys:
            names = self.split_keys.get(key)
            if names is None:
                values[key] = squeeze_scalar(group[key])
            else:
                values.update(zip(names, map(squeeze_scalar, group[key]), strict=True))
        return values

    def advance_group(self, group: dict[str, Any]) -> None:
        """The group's own bookkeeping of one step (a counter or a running sum kept in the group, as
        Schedule-Free keeps ``k``): the dispatcher calls it once per group and step, after every group
        is checked and just before the group's update runs, whether or not any of its params has a
        gradient. :meth:`update_arguments`, read while the step is planned, sees the group as it was
        before. The default keeps nothing."""

    def reduce(self, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[dict[str, Any]] | None:
        """Sums over parameters that ``update`` needs before it runs (Prodigy's step size estimate, a
        global gradient norm): called once per step with every group and its params that have a
        gradient, after all of them are checked and before any is planned. It may update state and
        group entries, and returns for each group the keyword arguments it adds to the group's
        hyperparameters, or None to skip the step. Defined only by algorithms that reduce
        (:attr:`reduces`)."""
        raise NotImplementedError

    @property
    def reduces(self) -> bool:
        """Whether the algorithm defines :meth:`reduce`."""
        return type(self).reduce is not ScratchOptimizer.reduce

    def init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of a parameter at its first step, keyed as torch keys it."""
        raise NotImplementedError

    def new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """:meth:`init_state`, its state tensors stored in the group's ``state_dtype``
        (:mod:`scratchopt.precision`)."""
        state = self.init_state(param, group)
        if precision.is_low(group):
            kept = precision.state_dtype_for(param, group)
            precision.cast_state(state, self.state_keys, param, kept, self)
        return state

    def count_step(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Initialise state lazily, count the step, return the per-parameter arguments of ``update``.

        Values returned as 0-d tensors are converted by the strategy (a Python number in the loop, as
        torch does; a tensor where a compiled kernel must not specialise on them).
        """
        state = self.state[param]
        if len(state) == 0:
            state.update(self.new_state(param, group))
        if "step" not in state:
            return {}
        state["step"] += 1
        return self.step_arguments(state["step"], group)

    def step_arguments(self, step: Any, group: dict[str, Any]) -> dict[str, Any]:
        """The per-parameter arguments of ``update`` at the just-counted step t (a 0-d tensor, or a
        Python number where a strategy counted many at once): ``{"step": t}`` by default. An algorithm
        whose update takes functions of t computed in Python (schedules, bias corrections) returns those
        instead, and every strategy, the native count of ``fused`` included, still counts t itself."""
        return {"step": step}

    def states_of(self, params: list[Tensor], group: dict[str, Any]) -> list[dict[str, Any]]:
        """Each param's state, initialised where it is empty (the first part of :meth:`count_step`)."""
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(self.new_state(p, group))
            states.append(state)
        return states

    def count_steps(self, params: list[Tensor], group: dict[str, Any]) -> list[dict[str, Any]]:
        """:meth:`count_step` for each param, its scalars as Python numbers, for a strategy that updates
        many params in one call. The default bookkeeping (``step += 1`` on 0-d tensors of one device)
        advances every counter with one multi-tensor add and reads them back at once; otherwise (an
        algorithm that overrides :meth:`count_step`, state without ``step``) it runs per param."""
        if self.default_count:
            states = self.states_of(params, group)
            counted = count_counters([state.get("step") for state in states])
            if counted is not None:
                return self.arguments_of_steps(counted, group)
        return [
            {k: v.item() if isinstance(v, Tensor) else v for k, v in self.count_step(p, group).items()} for p in params
        ]

    def arguments_of_steps(self, steps: list[float], group: dict[str, Any]) -> list[dict[str, Any]]:
        """:meth:`step_arguments` for each counted step, computed once per distinct step and shared."""
        found = {t: self.step_arguments(t, group) for t in set(steps)}
        return [found[t] for t in steps]

    def check_grad(self, param: Tensor) -> None:
        """Raise torch's error for a gradient this algorithm refuses (sparse ones, unless it takes them)."""
        if param.grad is not None and param.grad.is_sparse and self.sparse_error is not None:
            raise RuntimeError(self.sparse_error)

    def check_inputs(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Check the params a step will update, before it changes anything; every strategy's step calls
        it (through the dispatcher) with the group's params that have a gradient.

        Besides sparse gradients an algorithm refuses, each gradient must have its parameter's dtype,
        device and shape, each state tensor its parameter's dtype and device (and shape, where the update
        is elementwise), and the state every key the update needs (:mod:`scratchopt.step_checks`). After
        ``model.to(dtype or device)``, for one, the state does not match: torch's for-loop then fails
        halfway through a step (or, for some algorithms and dtypes, silently mixes precisions); every
        scratchopt strategy raises here instead, and ``optimizer.load_state_dict(optimizer.state_dict())``
        casts the state like the params.
        """
        if type(self).check_grad is ScratchOptimizer.check_grad:  # the default: one pass over the gradients
            if any(p.grad.is_sparse for p in params):  # type: ignore[union-attr]
                self.check_sparse_gradients(group)
        else:
            for param in params:
                self.check_grad(param)
        if precision.is_low(group):
            precision.check_params(self, group, params)
        check_gradients_match(self, params)
        check_state_matches(
            self,
            params,
            self.state_keys,
            same_shape=self.elementwise,
            state_dtype=group.get("state_dtype") if precision.is_low(group) else None,
        )
        check_state_keys(self, group, params)

    def check_sparse_gradients(self, group: dict[str, Any]) -> None:
        """Raise torch's error for a group in which some gradient is sparse (``sparse_error``, unless the
        algorithm takes sparse gradients)."""
        if self.sparse_error is not None:
            raise RuntimeError(self.sparse_error)

    @property
    def default_count(self) -> bool:
        """Whether the per-parameter bookkeeping is :meth:`count_step`'s own (``step += 1``, where the
        state has a ``step``), which a strategy may then do natively."""
        return type(self).count_step is ScratchOptimizer.count_step

    @property
    def default_checks(self) -> bool:
        """Whether this algorithm's checks are :meth:`check_inputs`'s own (a strategy may then make them
        natively): the gradient checks see only sparse gradients, the state checks dtypes and devices."""
        cls = type(self)
        return cls.check_grad is ScratchOptimizer.check_grad and cls.check_inputs is ScratchOptimizer.check_inputs

    def apply_updates(self) -> None:
        """Update every group with its strategy (:meth:`impl_of`, under ``torch.no_grad()``)."""
        with torch.no_grad():
            strategies.step(self)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; with a closure, re-evaluate the loss first and return it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.unscale_for_grad_scaler():
            self.apply_updates()
        return loss

    #: torch's contract with ``torch.amp.GradScaler``: the scaler calls ``step()`` directly, having set
    #: ``grad_scale`` (the scale to divide the gradients by, or None once ``scaler.unscale_`` ran) and
    #: ``found_inf`` on the optimizer, instead of unscaling every gradient in a pass of its own first.
    _step_supports_amp_scaling: ClassVar[bool] = True

    def unscale_for_grad_scaler(self) -> bool:
        """Under a GradScaler: False (the step is skipped, nothing changed) where it found an inf or NaN;
        else divide each gradient in place by ``grad_scale``, as ``scaler.unscale_`` would, and True."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return False
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return True
        grads: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads.setdefault((p.grad.device, p.grad.dtype, p.grad.is_sparse), []).append(p.grad)
        for (device, _, sparse), tensors in grads.items():
            scale = grad_scale.to(device)
            if sparse:
                for grad in tensors:
                    grad.div_(scale)
            else:
                torch._foreach_div_(tensors, scale)
        return True

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["default_impl"] = self.default_impl
        return state


class ClosureOptimizer(Algorithm):
    """An algorithm whose ``step(closure)`` is written out in full: it evaluates the loss (and its
    derivatives) itself, so there is no per-parameter ``update`` for strategies to run.

    ``impl`` is accepted for a uniform signature, and only as ``None`` or ``"loop"``.
    """

    needs_closure = True
    elementwise = False
    #: What the closure must do, for the error raised when it is missing.
    closure_contract: ClassVar[str] = (
        "one that zeroes the gradients, computes the loss, calls backward() and returns the loss"
    )
    impl = "loop"

    def __init__(self, params: Any, defaults: dict[str, Any], impl: str | None = None) -> None:
        if impl not in (None, "loop"):
            raise ValueError(only_the_loop(type(self).__name__, impl))
        super().__init__(params, defaults)

    def require_closure(self, closure: Any) -> None:
        """torch's LBFGS raises TypeError for a missing closure; so does every closure algorithm."""
        require_closure(self, closure, self.closure_contract)
