"""scratchopt inside ``torch.distributed``: stepping during backward, and the DTensor view the strategies
take of FSDP2's sharded tensors. scratchopt has no distributed engine of its own; FSDP2, DDP,
``ZeroRedundancyOptimizer`` and ``torch.distributed.checkpoint`` drive its optimizers as they drive
torch's (``docs/scaling.md``)."""

from scratchopt.distributed.overlap import StepInBackward, step_in_backward

__all__ = ["StepInBackward", "step_in_backward"]
