"""The models the benchmark times and the report measures, built in code, with data from a fixed seed.

* ``mlp`` — the seed MLP, ``mlp_layers`` × (Linear(64, 64), Tanh), batch 32: the deep MLP whose step
  times the seed article “Optimizers: math, implementations and efficiency” tabulates; at its 2000
  layers 4000 tensors and 8.3M params, overhead-bound;
* ``gpt`` — a GPT-like causal transformer: token and positional embeddings, ``gpt_layers`` pre-norm blocks
  (``nn.TransformerEncoderLayer``, 4 heads, MLP 4×), final LayerNorm, untied head; at the full sizes
  (d_model 256, vocabulary 2048, sequence 64, batch 8) 77 tensors and 5.8M params;
* ``tiny`` — Linear(10, 32), Tanh, Linear(32, 32), Tanh, Linear(32, 1): 6 tensors, 1,441 params;
* ``large`` — one parameter of ``large_params`` elements, loss ``torch.dot(p, x)`` with ``x`` fixed:
  memory-bound.

Sizes come from a :class:`scratchopt.tools.presets.Preset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scratchopt.tools.presets import Preset

SEED = 0
#: Batches each workload holds: enough for the largest number of micro-batches a training loop takes.
MAX_MICRO_BATCHES = 4
WORKLOAD_NAMES = ("mlp", "gpt", "tiny", "large")


class RegressionLoss(nn.Module):
    """``net`` trained on mean squared error; a batch is ``(inputs, targets)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.net(inputs), targets)


class TinyGPT(nn.Module):
    """A GPT-like causal language model; a batch is ``(tokens,)`` of ``seq_len + 1`` tokens per row."""

    def __init__(self, layers: int, width: int, vocab: int, seq_len: int, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x = self.tokens(inputs) + self.positions[: inputs.shape[1]]
        for block in self.blocks:
            x = block(x, src_mask=self.causal_mask, is_causal=True)
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LargeTensor(nn.Module):
    """One big parameter; a batch is ``(x,)`` and the loss ``p · x``: the cheapest backward there is."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(numel))

    def forward(self, x: Tensor) -> Tensor:
        return torch.dot(self.p, x)


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    #: ``MAX_MICRO_BATCHES`` batches, each a tuple of the model's inputs; single-batch loops cycle them.
    batches: list[tuple[Tensor, ...]]

    @property
    def tensors(self) -> int:
        return sum(1 for _ in self.model.parameters())

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _regression_batches(generator: torch.Generator, batch: int, inputs: int, outputs: int) -> list[tuple[Tensor, ...]]:
    return [
        (torch.randn(batch, inputs, generator=generator), torch.randn(batch, outputs, generator=generator))
        for _ in range(MAX_MICRO_BATCHES)
    ]


def make_workload(name: str, preset: Preset, device: torch.device) -> Workload:
    """Build one model and its batches, seeded (the same every call), at ``preset``'s sizes."""
    generator = torch.Generator().manual_seed(SEED)
    batches: list[tuple[Tensor, ...]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if name == "mlp":
            layers = preset.mlp_layers
            net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(64, 64), nn.Tanh())])
            workload = Workload(
                name,
                f"{layers} × (Linear(64, 64), Tanh), batch 32",
                RegressionLoss(net),
                _regression_batches(generator, 32, 64, 64),
            )
        elif name == "gpt":
            model = TinyGPT(preset.gpt_layers, preset.gpt_width, preset.gpt_vocab, preset.gpt_seq_len)
            batches = [
                (torch.randint(0, preset.gpt_vocab, (preset.gpt_batch, preset.gpt_seq_len + 1), generator=generator),)
                for _ in range(MAX_MICRO_BATCHES)
            ]
            workload = Workload(
                name,
                f"GPT-like, {preset.gpt_layers} layers, d_model {preset.gpt_width}, 4 heads, "
                f"vocab {preset.gpt_vocab}, seq {preset.gpt_seq_len}, batch {preset.gpt_batch}",
                model,
                batches,
            )
        elif name == "tiny":
            net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
            workload = Workload(
                name, "tiny MLP 10-32-32-1, batch 32", RegressionLoss(net), _regression_batches(generator, 32, 10, 1)
            )
        elif name == "large":
            x = torch.randn(preset.large_params, generator=generator)
            batches = [(x,)] * MAX_MICRO_BATCHES
            workload = Workload(
                name, f"one tensor of {preset.large_params:,}, loss p·x", LargeTensor(preset.large_params), batches
            )
        else:
            raise ValueError(f"unknown workload {name!r} (choices: {', '.join(WORKLOAD_NAMES)})")
    workload.model.to(device)
    workload.batches = [tuple(t.to(device) for t in batch) for batch in workload.batches]
    return workload


def model_size(tensors: int, numel: int) -> str:
    """``"6 tensors, 1,441 params"``."""
    return f"{tensors} tensor{'s' if tensors != 1 else ''}, {numel:,} params"
