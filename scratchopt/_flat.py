"""Flat buffers for ``impl="flat"`` and ``impl="fused"``: one contiguous tensor per (device, dtype).

For each param group, the parameters of one device and dtype are copied into one 1-d buffer and each
``Parameter`` is rebound to a view of it (``p.data = view``; strides are kept when the parameter is
dense, so a transposed parameter stays transposed). Gradients are views of a second buffer
(``p.grad = view``), which autograd accumulates into in place; each state tensor named in
``state_keys`` lives in a buffer of its own and ``optimizer.state[p][key]`` is a view; a 0-d
per-parameter state tensor (``step``) is a view of a ``(n_params,)`` buffer. The update then runs
once per buffer.

What users do, and what happens:

* ``zero_grad(set_to_none=False)`` zeroes the views in place: the next step is zero-copy.
* ``zero_grad()`` (``set_to_none=True``, torch's default), a ``.grad`` replaced by another tensor: autograd
  or the user allocates fresh gradients; the next step copies them into the buffer and rebinds
  ``p.grad`` to the view (so the step after is zero-copy again). Semantics stay torch's: a parameter
  whose ``.grad`` is None is not updated.
* Some parameters without a gradient on a step: the step runs on the views of those that have one,
  through the foreach machinery — the same ``update`` on a list of views — and the buffer is used whole
  again once every parameter is back in step.
* A parameter frozen with ``requires_grad_(False)``: it is kept out of the buffers (rebuilt when that
  changes), so that the others still run as one buffer; if it gets a gradient anyway it is updated on its
  own, like any parameter torch would update.
* ``add_param_group``: the new group gets its own buffers at its first step.
* ``load_state_dict``: torch replaces ``optimizer.state`` and the group dicts; the next step notices and
  rebuilds the buffers from the loaded state.
* ``model.to(...)``: the parameters (and gradients) stop being views of the buffers; the next step
  notices, rebuilds the buffers from the moved parameters, and moves the state with them (floating
  state to the parameter's dtype and device, as ``load_state_dict`` would cast it).

Fast-path checks cost two Python comparisons per parameter per step (is ``p.grad`` still our view?) plus
two storage use counts per buffer (did ``model.to()`` re-point views?). Assigning ``p.data`` by hand, or
replacing ``optimizer.state[p][key]`` by hand, is not noticed on the fast path.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from scratchopt._base import ScratchOptimizer

_get_grad = operator.attrgetter("grad")


def _use_count(tensor: Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def is_dense(tensor: Tensor) -> bool:
    """Its elements fill ``numel`` consecutive memory slots in some order (a permuted contiguous tensor)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def segment_view(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """A view of ``flat[offset : offset + like.numel()]`` shaped like ``like`` (its strides when dense)."""
    if like.dim() > 0 and is_dense(like):
        return flat.as_strided(like.shape, like.stride(), offset)
    return flat.as_strided(like.shape, torch.empty(like.shape, device="meta").stride(), offset)


class Buffer:
    """The flat storage of the params of one group that share a device and a dtype."""

    def __init__(self, optimizer: ScratchOptimizer, params: list[Tensor]) -> None:
        first = params[0]
        self.device, self.dtype = first.device, first.dtype
        self.params = params
        self.n = len(params)
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.flat = torch.empty(total, device=self.device, dtype=self.dtype)
        self.flat_grad = torch.zeros(total, device=self.device, dtype=self.dtype)
        self.grad_views: list[Tensor] = []
        for p, offset in zip(params, self.offsets):
            view = segment_view(self.flat, offset, p)
            view.copy_(p.detach())
            p.data = view
            self.grad_views.append(segment_view(self.flat_grad, offset, p))
        self.param_ptrs = [p.data_ptr() for p in params]
        self.state_flat: dict[str, Tensor] = {}  # state_keys → 1-d buffer
        self.state_scalar: dict[str, Tensor] = {}  # 0-d per-param state → (n,) buffer
        self.synced = False
        self.use_counts = (-1, -1)
        self.adopt_state(optimizer, range(self.n))

    # ---- checks ------------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        return _use_count(self.flat), _use_count(self.flat_grad)

    def fast_ready(self) -> bool:
        """Every param has its gradient as our view, state is in step and nothing was re-pointed."""
        if not self.synced:
            return False
        grads = list(map(_get_grad, self.params))
        if not all(map(operator.is_, grads, self.grad_views)):
            return False
        return self.counts() == self.use_counts

    def params_still_ours(self) -> bool:
        for p, ptr in zip(self.params, self.param_ptrs):
            if p.data_ptr() != ptr or p.dtype != self.dtype or p.device != self.device:
                return False
        return True

    def refresh_counts(self) -> None:
        self.use_counts = self.counts()

    # ---- gradients ---------------------------------------------------------------------------------
    def take_grads(self) -> tuple[list[int], list[int]]:
        """Indices of the params with a gradient now in the buffer, and of those handled per tensor."""
        inside, outside = [], []
        for index, (p, view) in enumerate(zip(self.params, self.grad_views)):
            grad = p.grad
            if grad is None:
                continue
            if grad is view and grad.data_ptr() == view.data_ptr() and view.untyped_storage().data_ptr() == \
                    self.flat_grad.untyped_storage().data_ptr():
                inside.append(index)
            elif (grad.layout == torch.strided and grad.dtype == self.dtype and grad.device == self.device
                  and grad.shape == p.shape):
                fresh = segment_view(self.flat_grad, self.offsets[index], p)
                fresh.copy_(grad)
                self.grad_views[index] = fresh
                p.grad = fresh
                inside.append(index)
            else:
                outside.append(index)
        return inside, outside

    # ---- state -------------------------------------------------------------------------------------
    def adopt_state(self, optimizer: ScratchOptimizer, indices: Any) -> bool:
        """Move the state of these params into the buffers (views in ``optimizer.state``).

        Returns False when some state cannot live in a buffer (it then stays as it is).
        """
        ok = True
        for index in indices:
            p = self.params[index]
            state = optimizer.state.get(p)
            if not state:
                continue
            offset = self.offsets[index]
            for key, value in list(state.items()):
                if not isinstance(value, Tensor):
                    continue
                if key in optimizer.state_keys:
                    if value.shape != p.shape or value.layout != torch.strided:
                        ok = False
                        continue
                    if value.device != self.device:
                        value = value.to(self.device)
                    buffer = self.state_flat.get(key)
                    if buffer is None:
                        buffer = self.state_flat[key] = torch.zeros(self.numel, device=self.device, dtype=value.dtype)
                    elif buffer.dtype != value.dtype:
                        ok = False
                        continue
                    view = segment_view(buffer, offset, p)
                    if view is value or (value.data_ptr() == view.data_ptr() and value.stride() == view.stride()
                                         and value.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()):
                        continue
                    view.copy_(value)
                    state[key] = view
                elif value.dim() == 0 and value.layout == torch.strided:
                    buffer = self.state_scalar.get(key)
                    if buffer is None:
                        buffer = self.state_scalar[key] = torch.zeros(self.n, device=value.device, dtype=value.dtype)
                    elif buffer.dtype != value.dtype or buffer.device != value.device:
                        ok = False
                        continue
                    view = buffer[index]
                    if value.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() and \
                            value.data_ptr() == view.data_ptr():
                        continue
                    view.copy_(value)
                    state[key] = view
        return ok

    def check_synced(self, optimizer: ScratchOptimizer) -> bool:
        """Every param has the same state keys, all in the buffers, and equal per-param scalars."""
        states = [optimizer.state.get(p) for p in self.params]
        keys = None
        for state in states:
            state_keys = frozenset(state) if state else frozenset()
            if keys is None:
                keys = state_keys
            elif state_keys != keys:
                return self._set_synced(False)
        for key in keys or ():
            values = [state[key] for state in states]
            first = values[0]
            if isinstance(first, Tensor):
                if key in self.state_flat:
                    buffer = self.state_flat[key]
                    storage = buffer.untyped_storage().data_ptr()
                    if any(v.untyped_storage().data_ptr() != storage for v in values):
                        return self._set_synced(False)
                elif key in self.state_scalar:
                    buffer = self.state_scalar[key]
                    storage = buffer.untyped_storage().data_ptr()
                    if any(v.untyped_storage().data_ptr() != storage for v in values):
                        return self._set_synced(False)
                    if not bool((buffer == buffer[0]).all()):
                        return self._set_synced(False)
                else:
                    return self._set_synced(False)
            elif any(v != first or type(v) is not type(first) for v in values[1:]):
                return self._set_synced(False)
        return self._set_synced(True)

    def _set_synced(self, value: bool) -> bool:
        self.synced = value
        return value

    def flat_states(self, optimizer: ScratchOptimizer) -> list[Tensor | None]:
        """The buffers of ``state_keys`` in the order ``update`` takes them (None where absent)."""
        state = optimizer.state.get(self.params[0], {})
        return [self.state_flat.get(key) if key in state else None for key in optimizer.state_keys]

    def broadcast_scalars(self, optimizer: ScratchOptimizer, source: dict[str, Any]) -> None:
        """After ``_prepare`` ran for params[0] only, give every other param the same per-param state."""
        for key, value in source.items():
            if key in self.state_flat:
                continue
            buffer = self.state_scalar.get(key)
            if buffer is not None:
                buffer.fill_(value.item() if value.device.type == "cpu" else value.clone())
            elif not isinstance(value, Tensor):
                for p in self.params[1:]:
                    optimizer.state[p][key] = value


class Layout:
    """The buffers of one param group."""

    def __init__(self, optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
        self.group = group
        self.state_object = optimizer.state
        self.n_params = len(group["params"])
        # A param that does not require grad (frozen) stays out of the buffers: it would keep the
        # buffer from ever being updated whole. It is updated per tensor if it gets a gradient anyway.
        self.outsiders = [p for p in group["params"] if not p.requires_grad]
        by_kind: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            if p.requires_grad:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
        self.buffers = [Buffer(optimizer, params) for params in by_kind.values()]
        for buffer in self.buffers:
            buffer.check_synced(optimizer)
            buffer.refresh_counts()

    def membership_changed(self) -> bool:
        """A param was frozen or unfrozen (``requires_grad``) since the buffers were made."""
        return any(p.requires_grad for p in self.outsiders) or any(
            not p.requires_grad for buffer in self.buffers for p in buffer.params)

    def current(self, optimizer: ScratchOptimizer, group: dict[str, Any]) -> bool:
        return (self.group is group and self.state_object is optimizer.state
                and len(group["params"]) == self.n_params)


def move_state_like_params(optimizer: ScratchOptimizer, group: dict[str, Any]) -> None:
    """After ``model.to()``: state follows its param, as ``load_state_dict`` would cast it."""
    for p in group["params"]:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in list(state.items()):
            if not isinstance(value, Tensor):
                continue
            if key in optimizer.state_keys:
                if value.is_floating_point() or value.is_complex():
                    state[key] = value.to(device=p.device, dtype=p.dtype)
                else:
                    state[key] = value.to(device=p.device)
            elif value.dim() == 0:
                state[key] = value.clone()  # leave the shared (n,) buffer: the layout is rebuilt


def layout_for(optimizer: ScratchOptimizer, group: dict[str, Any]) -> Layout:
    layouts = optimizer.__dict__.setdefault("_scratchopt_layouts", {})
    layout = layouts.get(id(group))
    if layout is not None and layout.current(optimizer, group):
        return layout
    if layout is not None and layout.group is group:
        # Same group, but params were re-pointed or state replaced: state follows the params.
        move_state_like_params(optimizer, group)
    layout = Layout(optimizer, group)
    layouts[id(group)] = layout
    # Drop layouts of groups that are gone (load_state_dict makes new group dicts).
    alive = {id(g) for g in optimizer.param_groups}
    for key in [k for k in layouts if k not in alive]:
        del layouts[key]
    return layout


def rebuild(optimizer: ScratchOptimizer, group: dict[str, Any]) -> Layout:
    layouts = optimizer.__dict__.setdefault("_scratchopt_layouts", {})
    layouts.pop(id(group), None)
    move_state_like_params(optimizer, group)
    layout = Layout(optimizer, group)
    layouts[id(group)] = layout
    return layout
