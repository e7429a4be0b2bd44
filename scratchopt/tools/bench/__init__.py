"""``scratchopt bench``: the optimizer step timed inside a real training loop, scratchopt beside torch.optim.

The optimizer step is timed inside the loop, not on gradients set once, because the loop decides what
the step costs: with ``zero_grad()``'s default every backward allocates fresh gradient tensors (a
strategy that kept gradients in a buffer of its own would gather them again on every step), and the
backward pass leaves the caches cold. Both medians are reported: ``opt.step()`` alone and the whole train step
(zero_grad, forward, backward, step).

Loops (:data:`~scratchopt.tools.bench.columns.MODES`): ``set-to-none`` (``zero_grad()``, the default),
``set-to-zero`` (``zero_grad(set_to_none=False)``: gradients stay in place between steps) and
``accumulate-4`` (``zero_grad()``, four forward+backward micro-batches, one step). The full preset runs
``set-to-none`` for every algorithm, and for AdamW ``set-to-zero`` on the mlp, tiny and large models and
``accumulate-4`` on the tiny and large ones, to stay within a few minutes on two cores (the GPT's and
the 2000-layer MLP's forward+backward cost the most, four times over when accumulating); ``--modes``
runs the loops it names for every algorithm and model. The models are those of
:mod:`scratchopt.tools.workloads`; every column trains its own deep copy of the same model on the same
batches.

One module per job:

* :mod:`~scratchopt.tools.bench.columns` — the rows (from the algorithm registry), the columns (torch's
  implementations and one per strategy, from the strategy registry) and the loops;
* :mod:`~scratchopt.tools.bench.timing` — one column's timed training loop;
* :mod:`~scratchopt.tools.bench.roofline` — the bytes a step must move and the measured bandwidth;
* :mod:`~scratchopt.tools.bench.memory` — the state an optimizer holds and the peak extra memory of a step;
* :mod:`~scratchopt.tools.bench.cold_start` — the first fused step, in fresh processes;
* :mod:`~scratchopt.tools.bench.targets` — the goals of the fused strategy, with plain-words verdicts;
* :mod:`~scratchopt.tools.bench.run` — every row, its columns interleaved: :func:`run_bench`;
* :mod:`~scratchopt.tools.bench.table` — the printed tables, ``bench.json``, ``bench.csv``, ``bench.png``;
* :mod:`~scratchopt.tools.bench.cli` — the command's options.

This package imports none of them itself, so that importing one does not import the others.
"""
