"""DTensors (FSDP2's parameters, gradients and state) as the strategies see them: their local shards.

An elementwise update of each local shard is the update of the whole tensor, so the strategies that
run on buffers or kernels work on ``to_local()`` views (FSDP2's own sharded storage, updated in place)
and hand ``optimizer.state`` DTensors sharded like their params, as ``torch.distributed.checkpoint``
expects.
"""

from __future__ import annotations

from typing import Any

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


def sharded_like(view: Tensor, like: Tensor) -> Tensor:
    """``view`` (a local shard) as a DTensor placed like ``like``, or ``view`` itself for a plain ``like``."""
    if not is_dtensor(like):
        return view
    mesh = like.device_mesh  # type: ignore[attr-defined]  # a DTensor
    return DTensor.from_local(view, mesh, placements(like), run_check=False, shape=like.shape, stride=like.stride())


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
