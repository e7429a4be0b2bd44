"""DTensors (FSDP2's parameters, gradients and state) as the strategies see them: their local shards.

An elementwise update of each local shard is the update of the whole tensor, so the strategies that
run on buffers or kernels work on ``to_local()`` views (FSDP2's own sharded storage, updated in place)
and hand ``optimizer.state`` DTensors sharded like their params, as ``torch.distributed.checkpoint``
expects.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DTensor: Any
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (a view of its storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]  # a DTensor


def placements(tensor: Tensor) -> Any:
    """A DTensor's placements (None for a plain tensor)."""
    return getattr(tensor, "placements", None)


def sharded_like(view: Tensor, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """``view`` (a local shard) as a DTensor placed like ``like``, or ``view`` itself for a plain ``like``;
    ``shape``: the whole tensor's (contiguous), where it is not ``like``'s."""
    if not is_dtensor(like):
        return view
    mesh = like.device_mesh  # type: ignore[attr-defined]  # a DTensor
    if shape is None:
        return DTensor.from_local(view, mesh, placements(like), run_check=False, shape=like.shape, stride=like.stride())
    stride = tuple(int(torch.Size(shape[d + 1 :]).numel()) for d in range(len(shape)))
    return DTensor.from_local(view, mesh, placements(like), run_check=False, shape=torch.Size(shape), stride=stride)


def holds_whole_rows(tensor: Tensor) -> bool:
    """Whether each rank's shard of a DTensor is a range of its rows (every placement ``Shard(0)`` or
    ``Replicate()``, FSDP2's default), so that state kept row by row shards like it."""
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements(tensor))


def global_offset(tensor: Tensor) -> int:
    """Where a DTensor's local shard starts in the whole tensor (the flat row-major index of its first
    element; the shard's elements follow it in that order where :func:`holds_whole_rows`); 0 for a plain
    tensor."""
    if not is_dtensor(tensor):
        return 0
    # The shard's place, as torch.distributed.checkpoint reads it.
    chunk = tensor.__create_chunk_list__()[0]  # type: ignore[attr-defined]  # a DTensor
    strides = [int(torch.Size(tensor.shape[d + 1 :]).numel()) for d in range(tensor.dim())]
    return sum(int(offset) * stride for offset, stride in zip(chunk.offsets, strides, strict=True))


def local_shards(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """DTensors placed alike (a param, its gradient and its state) as their local shards; tensors placed
    differently, or plain tensors, are returned as they are."""
    present = [t for t in tensors if t is not None]
    if (
        not present
        or not is_dtensor(present[0])
        or not all(is_dtensor(t) and placements(t) == placements(present[0]) for t in present)
    ):
        return tensors
    return [None if t is None else local(t) for t in tensors]
