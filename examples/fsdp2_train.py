"""Train a small model with FSDP2 and a scratchopt optimizer, beside torch.optim, on CPU processes.

Run it on two processes of one machine (gloo):

    torchrun --nproc_per_node 2 examples/fsdp2_train.py
    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py --impl fused --steps 50
    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py --state-dtype 8bit

``--standalone`` lets torchrun pick a free port instead of its default 29500.

The model (a 3-layer MLP regressing a fixed random teacher network) is wrapped with
``torch.distributed.fsdp.fully_shard``: every rank holds a shard of each parameter as a DTensor, and the
optimizer, built on ``model.parameters()`` as usual, updates only its rank's shards and keeps its state as
DTensors sharded the same way. A second copy of the model trains with ``torch.optim.AdamW`` on the same
batches, and the script prints both losses and the largest difference between the two models' parameters
(zero for the bit-exact strategies loop and foreach; a few units in the last place for compiled and
fused). With ``--state-dtype bfloat16`` or ``8bit`` the optimizer keeps its state in low precision (8-bit
for the 64 × 64 layer, row by row; the smaller tensors stay float32), and the difference is how far that
moves the run from torch.optim's float32 one.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import scratchopt

INPUTS, HIDDEN, OUTPUTS, BATCH = 32, 64, 8, 64


def build_model(mesh: torch.distributed.device_mesh.DeviceMesh) -> nn.Sequential:
    """The same initial values on every rank (seeded), then sharded layer by layer and as a whole."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(INPUTS, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUTPUTS)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batches(steps: int, rank: int) -> list[tuple[Tensor, Tensor]]:
    """Each rank's own data: inputs, and targets from a fixed teacher network plus a little noise."""
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUTPUTS))
    generator = torch.Generator().manual_seed(100 + rank)
    data = []
    with torch.no_grad():
        for _ in range(steps):
            inputs = torch.randn(BATCH, INPUTS, generator=generator)
            data.append((inputs, teacher(inputs) + 0.01 * torch.randn(BATCH, OUTPUTS, generator=generator)))
    return data


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor) -> Tensor:
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


def mean_over_ranks(value: Tensor) -> float:
    dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return float(value)


def largest_difference(model: nn.Module, reference: nn.Module) -> float:
    """The largest elementwise difference between two models' whole parameters (a collective)."""
    with torch.no_grad():
        differences = [
            (p.full_tensor() - r.full_tensor()).abs().max() for p, r in zip(model.parameters(), reference.parameters())
        ]
    return float(torch.stack(differences).max())


def main(argv: list[str] | None = None) -> float:
    """Train, print the losses and the difference from torch.optim on rank 0, return that difference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--impl", default="fused", choices=scratchopt.strategies.NAMES, help="the scratchopt strategy (default: fused)"
    )
    parser.add_argument(
        "--state-dtype", default="float32", choices=("float32", "bfloat16", "8bit"), help="the optimizer's state"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    # Two processes share the machine's cores: one intra-op thread each keeps them from contending.
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment says where the other ranks are
    try:
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        model, reference = build_model(mesh), build_model(mesh)
        state_dtype = getattr(torch, args.state_dtype) if args.state_dtype != "8bit" else "8bit"
        optimizer = scratchopt.AdamW(
            model.parameters(), lr=args.lr, weight_decay=0.01, impl=args.impl, state_dtype=state_dtype
        )
        torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=0.01, foreach=False)
        for step, (inputs, targets) in enumerate(batches(args.steps, rank)):
            loss = mean_over_ranks(train_step(model, optimizer, inputs, targets))
            torch_loss = mean_over_ranks(train_step(reference, torch_optimizer, inputs, targets))
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {loss:.6f}  (torch.optim.AdamW: {torch_loss:.6f})", flush=True)
        shard = optimizer.state[model[2].weight]["exp_avg"]
        difference = largest_difference(model, reference)
        if rank == 0:
            if isinstance(shard, DTensor):
                print(
                    f"scratchopt.AdamW(impl={args.impl!r}, state_dtype={args.state_dtype}): exp_avg of the "
                    f"middle layer's weight is a {shard.dtype} DTensor placed {shard.placements}, this rank's "
                    f"shard {tuple(shard.to_local().shape)} of {tuple(shard.shape)}"
                )
            else:
                print(f"scratchopt.AdamW(impl={args.impl!r}): the state is not a DTensor")
            print(f"largest difference from torch.optim: {difference:.3e}", flush=True)
        return difference
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
