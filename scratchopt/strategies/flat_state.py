"""The flat state of ``impl="flat"``: the optimizer's state in one buffer per key.

The optimizer owns its state, not the parameters or the gradients, so only the state is laid out flat.
For each param group, the params of one device and dtype that had a dense gradient when the layout was
made (the *members*) get one contiguous buffer per state key, and ``optimizer.state[p][key]`` is a view
of it; each 0-d per-parameter state tensor (``step``, NAdam's ``mu_product``) is an element of an
``(n_members,)`` buffer, so every counter advances with one call. A step then

1. gathers the small members' fresh gradients into a scratch buffer with one multi-tensor copy,
2. gathers those params into a second scratch buffer — unless every member is small and they already
   are consecutive views of one storage (see :func:`contiguous_parameters`): then that storage is the
   buffer (zero copy),
3. runs the algorithm's ``update`` once on the buffers, and once on each large member (at least
   :data:`DIRECT_NUMEL` elements) where it lies, beside its segment of the state buffers: copying a
   large param in and out would cost more than a call of its own,
4. copies the results back into the small params, in the storage they had.

Parameters are never moved: an EMA helper, a ``p.detach()`` taken earlier, FSDP2's sharded storage and
``torch.save(module.state_dict())`` all keep seeing the parameters they had.

A step takes that path when the params with a gradient are exactly the members, their gradients are
dense and of the members' dtype, and the members' per-parameter scalars (``step``…) agree. Anything else
(a param without a gradient on this step, a sparse gradient, ``model.to()``, ``load_state_dict``, a new
param) goes through the strategy's per-parameter path, which also rebuilds the layout when the
membership changed. Replacing ``optimizer.state[p][key]`` by hand is not noticed; changing it in place
is (the state tensors are views of the buffers, and the per-parameter scalars are compared every step).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from scratchopt.distributed.dtensor import is_dtensor, local, placements, sharded_like

if TYPE_CHECKING:
    from scratchopt.optimizer import ScratchOptimizer

#: ATen copies a tensor smaller than this on one thread (``at::internal::GRAIN_SIZE``).
_ONE_THREAD_NUMEL = 32768
#: A param of at least this many elements is updated where it lies rather than gathered. Gathering moves
#: 24 B per float32 element (gradient in, param in and out), more than a separate update call costs
#: from about 2^18 elements.
DIRECT_NUMEL = 262144
#: Below this many tensors a multi-tensor copy is not worth splitting across threads.
_MIN_TENSORS_TO_SPLIT = 64

_dtype_of = operator.attrgetter("dtype")
#: The copy threads: (process id, number of workers, pool). One pool serves every layout of the process;
#: it grows (the old one is shut down) when a layout needs more workers than it has.
_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads made in this process (a forked child gets a new one: the
    parent's threads are not there)."""
    global _pool
    if _pool is not None and _pool[0] == os.getpid() and _pool[1] >= workers:
        return _pool[2]
    if _pool is not None and _pool[0] == os.getpid():
        _pool[2].shutdown(wait=False)
    _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="scratchopt-copy"))
    return _pool[2]


def is_dense(tensor: Tensor) -> bool:
    """Its elements fill ``numel`` consecutive memory slots in some order (a permuted contiguous tensor)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def segment_view(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """``flat[offset : offset + like.numel()]`` shaped like ``like``, with its strides when it is dense."""
    strides = like.stride() if is_dense(like) else torch.empty(like.shape, device="meta").stride()
    return flat.as_strided(like.shape, strides, flat.storage_offset() + offset)


class MultiCopy:
    """``torch._foreach_copy_(destinations, sources)`` for lists of tensors of fixed sizes.

    On the CPU torch's multi-tensor copy runs tensor by tensor on one thread, about 2 µs per tensor: for
    thousands of small tensors that is most of an optimizer step. Split into one slice per thread it
    takes a fraction of that (each ``copy_`` releases the GIL).
    """

    def __init__(self, like: list[Tensor]) -> None:
        threads = torch.get_num_threads()
        total = sum(t.numel() for t in like)
        splittable = (
            like[0].device.type == "cpu"
            and threads > 1
            and len(like) >= _MIN_TENSORS_TO_SPLIT
            and total < _ONE_THREAD_NUMEL * len(like)
        )
        self.slices = [slice(0, len(like))]
        if splittable:
            self.slices, start, done = [], 0, 0
            for index, tensor in enumerate(like):
                done += tensor.numel()
                if done * threads >= total * (len(self.slices) + 1) or index == len(like) - 1:
                    self.slices.append(slice(start, index + 1))
                    start = index + 1

    def __call__(self, destinations: list[Tensor], sources: list[Tensor]) -> None:
        if len(self.slices) == 1:
            torch._foreach_copy_(destinations, sources)
            return
        pool = thread_pool(len(self.slices) - 1)
        pending = [pool.submit(_copy_without_grad, destinations[s], sources[s]) for s in self.slices[1:]]
        try:
            torch._foreach_copy_(destinations[self.slices[0]], sources[self.slices[0]])
        finally:
            for future in pending:
                future.result()


def memory_order_1d(tensor: Tensor) -> Tensor | None:
    """A 1-d view of a dense tensor's elements in the order they lie in memory, or None if not dense."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if not is_dense(tensor):
        return None
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def _copy_without_grad(destinations: list[Tensor], sources: list[Tensor]) -> None:
    # Grad mode is per thread: a pool thread must leave autograd out of the copy as the caller does.
    with torch.no_grad():
        torch._foreach_copy_(destinations, sources)


def _consecutive_storage(params: list[Tensor]) -> Tensor | None:
    """One 1-d tensor over the params' storage when they are dense and lie back to back in it, in order."""
    first = params[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for p in params:
        if not is_dense(p) or p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset:
            return None
        offset += p.numel()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(storage, first.storage_offset(), (offset - first.storage_offset(),), (1,))


class FlatState:
    """The members of one group that share a device and a dtype, and their state in flat buffers.

    Under FSDP2 the members are DTensors: everything here works on their local shards (an elementwise
    update of each shard is the update of the whole), and the state handed to ``optimizer.state`` is
    DTensors sharded like their params, as ``torch.distributed.checkpoint`` expects.
    """

    def __init__(self, optimizer: ScratchOptimizer, members: list[Tensor], positions: list[int]) -> None:
        first = members[0]
        self.sharded = is_dtensor(first)
        self.dtype, self.device = first.dtype, first.device
        self.members = members
        # A large param is updated where it lies, by a call of its own: copying it (or its gradient) into
        # a buffer would cost more than that call. Small ones are gathered, and come first; when all are
        # small and already lie back to back in one storage (contiguous_parameters), that storage is the
        # buffer (zero copy).
        large = [memory_order_1d(local(p)) is not None and local(p).numel() >= DIRECT_NUMEL for p in members]
        self.flat_param = None if self.sharded or any(large) else _consecutive_storage(self.local_params())
        self.contiguous = self.flat_param is not None
        if not self.contiguous:
            order = sorted(range(len(members)), key=lambda i: large[i])
            self.members = [members[i] for i in order]
            positions = [positions[i] for i in order]
            self.n_gathered = large.count(False)
        else:
            self.n_gathered = len(members)
        self.positions = positions
        self.take_grads = (
            operator.itemgetter(*positions) if len(positions) > 1 else (lambda grads: (grads[positions[0]],))
        )
        shards = self.local_params()
        self.offsets, total = [], 0
        for shard in shards:
            self.offsets.append(total)
            total += shard.numel()
        self.numel = total
        self.gathered_numel = self.offsets[self.n_gathered] if self.n_gathered < len(shards) else total
        self.direct_strides = [shard.stride() for shard in shards[self.n_gathered :]]
        gathered = shards[: self.n_gathered]
        self.copy = MultiCopy(gathered) if gathered else None
        if self.contiguous:
            self.data_ptrs = [p.data_ptr() for p in members]
        else:
            self.flat_param = torch.empty(self.gathered_numel, dtype=self.dtype, device=self.device)
            self.param_views = self._views(self.flat_param, gathered)
        self.flat_grad = torch.empty(self.gathered_numel, dtype=self.dtype, device=self.device)
        self.grad_views = self._views(self.flat_grad, gathered)
        self.state_buffers: dict[str, Tensor] = {}
        self.scalar_buffers: dict[str, Tensor] = {}
        self.adopted = self._adopt_state(optimizer, shards)

    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.members] if self.sharded else self.members

    def _views(self, flat: Tensor, shards: list[Tensor]) -> list[Tensor]:
        return [segment_view(flat, offset, shard) for shard, offset in zip(shards, self.offsets)]

    def _adopt_state(self, optimizer: ScratchOptimizer, shards: list[Tensor]) -> bool:
        """Copy the members' state into flat buffers and make ``optimizer.state`` hold views of them.

        Returns False (and leaves the state as it is) when the members' states differ in keys, shapes,
        dtypes or devices: such a layout never runs whole.
        """
        states = [optimizer.state.get(p, {}) for p in self.members]
        keys = set(states[0])
        if any(set(state) != keys for state in states[1:]):
            return False
        buffers: dict[str, Tensor] = {}
        for key in keys:
            values = [state[key] for state in states]
            if not all(isinstance(v, Tensor) and v.layout == torch.strided for v in values):
                if any(isinstance(v, Tensor) for v in values):
                    return False
                continue
            if key in optimizer.state_keys:
                if not all(
                    v.shape == p.shape
                    and v.dtype == self.dtype
                    and v.device == self.device
                    and is_dtensor(v) == self.sharded
                    for v, p in zip(values, self.members)
                ):
                    return False
                buffers[key] = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            elif all(
                v.dim() == 0 and type(v) is Tensor and v.dtype == values[0].dtype and v.device == values[0].device
                for v in values
            ):
                buffers[key] = torch.stack(values)
            else:
                return False
        for key, buffer in buffers.items():
            if key in optimizer.state_keys:
                views = self._views(buffer, shards)
                torch._foreach_copy_(views, [local(state[key]) for state in states])
                views = [sharded_like(view, state[key]) for view, state in zip(views, states)]
                self.state_buffers[key] = buffer
            else:
                views = list(buffer.unbind())
                self.scalar_buffers[key] = buffer
            for state, view in zip(states, views):
                state[key] = view
        return True

    def update_arguments(self, optimizer: ScratchOptimizer, grads: Sequence[Tensor]) -> list[list[Tensor | None]]:
        """The tensors of each ``update`` call of a step, in the order ``update`` takes them: the gathered
        buffers (after :meth:`gather`), then each large param where it lies, as 1-d views in memory order
        beside its segment of the state buffers (None for a state key that is absent)."""
        calls = []
        if self.n_gathered:
            states = [
                None if (buffer := self.state_buffers.get(key)) is None else buffer[: self.gathered_numel]
                for key in optimizer.state_keys
            ]
            calls.append([self.flat_param, self.flat_grad, *states])
        for index in range(self.n_gathered, len(self.members)):
            param = local(self.members[index])
            grad = local(grads[index])
            if grad.stride() != param.stride():
                grad = segment_view(torch.empty(param.numel(), dtype=grad.dtype, device=grad.device), 0, param).copy_(
                    grad
                )
            start, stop = self.offsets[index], self.offsets[index] + param.numel()
            states = [
                None if (buffer := self.state_buffers.get(key)) is None else buffer[start:stop]
                for key in optimizer.state_keys
            ]
            calls.append([memory_order_1d(param), memory_order_1d(grad), *states])
        return calls

    def check_uniform(self) -> bool:
        """Every member's per-parameter scalars agree: they do unless some skipped a step or a user reset
        one in place (``state[p]["step"].fill_(0)``), so they are compared at every step."""
        return all(bool((buffer == buffer[0]).all()) for buffer in self.scalar_buffers.values())

    def params_in_place(self) -> bool:
        """The zero-copy layout still covers the params (``model.to()`` or ``p.data = …`` re-point them),
        and the params updated where they lie keep the memory order of their state segments."""
        if self.contiguous:
            return list(map(Tensor.data_ptr, self.members)) == self.data_ptrs
        return all(
            local(p).stride() == strides for p, strides in zip(self.members[self.n_gathered :], self.direct_strides)
        )

    def accepts(self, grads: Sequence[Tensor]) -> bool:
        """The gradients can be gathered as they are: of the members' dtype and device, sharded like
        them (dense is checked by the copy itself, which refuses a sparse source before writing).

        A gradient has its parameter's dtype (autograd makes it so, and ``p.grad = g`` refuses another),
        so while the zero-copy params are still in place (:meth:`params_in_place`) their gradients'
        dtypes need no look; otherwise ``model.to(dtype)`` shows in them.
        """
        if grads[0].device != self.device or (not self.contiguous and set(map(_dtype_of, grads)) != {self.dtype}):
            return False
        return not self.sharded or all(
            is_dtensor(g) and placements(g) == placements(p) for g, p in zip(grads, self.members)
        )

    def gather(self, grads: Sequence[Tensor]) -> None:
        """Copy the small params' gradients (and, unless zero-copy, the params) into the buffers."""
        if self.copy is None:
            return
        gathered = list(grads[: self.n_gathered])
        self.copy(self.grad_views, [local(g) for g in gathered] if self.sharded else gathered)
        if not self.contiguous:
            self.copy(self.param_views, self.local_params()[: self.n_gathered])

    def scatter(self) -> None:
        if self.copy is not None and not self.contiguous:
            self.copy(self.local_params()[: self.n_gathered], self.param_views)

    def advance_scalars(self, optimizer: ScratchOptimizer, group: dict[str, Any]) -> dict[str, Any]:
        """Run the algorithm's per-parameter bookkeeping (``step += 1`` …) once, for every member at once.

        ``count_step`` runs on the first member, whose scalars are element 0 of each buffer; the other
        elements then take its new values (they were equal before: :meth:`check_uniform`).
        """
        values = optimizer.count_step(self.members[0], group)
        for buffer in self.scalar_buffers.values():
            buffer.copy_(buffer[0].clone().expand_as(buffer))
        return values


class GroupLayout:
    """The flat states of one param group, and which of its params are members."""

    def __init__(self, optimizer: ScratchOptimizer, group: dict[str, Any], members: list[Tensor]) -> None:
        self.group, self.params = group, group["params"]
        self.n_params = len(self.params)
        self.n_members = len(members)
        member_ids = {id(p) for p in members}
        self.has_grad = [id(p) in member_ids for p in self.params]
        by_kind: dict[tuple, tuple[list[Tensor], list[int]]] = {}
        for position, p in enumerate(self.params):
            if id(p) in member_ids:
                kind = by_kind.setdefault((p.device, p.dtype), ([], []))
                kind[0].append(p)
                kind[1].append(position)
        self.flats = [FlatState(optimizer, params, positions) for params, positions in by_kind.values()]

    def covers(self, group: dict[str, Any]) -> bool:
        return self.group is group and group["params"] is self.params and len(self.params) == self.n_params

    def member_grads(self, grads: list[Tensor | None]) -> list[tuple[Tensor, ...]] | None:
        """Each flat state's gradients when exactly the members have one and all can be gathered."""
        if [g is not None for g in grads] != self.has_grad:
            return None
        taken = []
        for flat in self.flats:
            flat_grads = flat.take_grads(grads)
            if not (flat.adopted and flat.check_uniform() and flat.params_in_place() and flat.accepts(flat_grads)):
                return None
            taken.append(flat_grads)
        return taken


def contiguous_parameters(module: nn.Module) -> list[Tensor]:
    """Lay out ``module``'s parameters back to back in one buffer per device and dtype, in place.

    The opt-in zero-copy mode (the layout DeepSpeed and FSDP1 use): each parameter keeps its identity,
    shape, strides and values, but its data becomes a view of a shared buffer (``p.data = view``), so a
    flat optimizer built afterwards notices the contiguity and updates the buffer directly,
    without gathering the params and copying them back. Call it before creating the optimizer (and
    before taking references to parameter storage, such as an EMA copy). Moving the module afterwards
    (``module.to(...)``) re-points the parameters; the optimizer notices and falls back to copying.

    Consequence to know: ``torch.save`` of one parameter (or of one submodule's ``state_dict()``) writes
    the whole shared buffer it is a view of; clone it first to save one tensor alone.

    Returns the buffers, one per (device, dtype), in the order of ``module.parameters()``.
    """
    by_kind: dict[tuple, list[nn.Parameter]] = {}
    for p in module.parameters():
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    buffers = []
    with torch.no_grad():
        for (device, dtype), params in by_kind.items():
            flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
            offset = 0
            for p in params:
                view = segment_view(flat, offset, p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
            buffers.append(flat)
    return buffers
