"""``scratchopt bench``'s options and what the command does with them: run, print, save.

The options are defined from the registries (rows, columns, modes, workloads), so a new algorithm or
strategy is a new choice without an edit here. The measuring modules are imported only when the
command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from scratchopt.tools.bench.columns import COLUMNS, MODES, algorithm_rows, preset_columns
from scratchopt.tools.presets import ALIASES, PRESETS, preset
from scratchopt.tools.workloads import WORKLOAD_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rows, _ = algorithm_rows()
    full, quick = PRESETS["full"], PRESETS["quick"]
    parser.add_argument(
        "--preset",
        choices=sorted([*PRESETS, *ALIASES]),
        default="full",
        help="full (the default, also called default: every algorithm, about ten minutes on 2 cores) or quick "
        "(three algorithms, well under a minute)",
    )
    parser.add_argument(
        "--algorithms",
        help=f"comma-separated rows (default: {','.join(full.algorithms) or 'all'}; choices: {', '.join(rows)})",
    )
    parser.add_argument("--workloads", help=f"comma-separated models (choices: {', '.join(WORKLOAD_NAMES)})")
    parser.add_argument("--columns", help=f"comma-separated (choices: {', '.join(COLUMNS)})")
    parser.add_argument(
        "--modes",
        help=f"comma-separated loops, run for every algorithm and model (choices: "
        f"{', '.join(MODES)}; default: {', '.join(full.modes)} for all, the others for "
        f"{', '.join(full.more_modes_algorithms)} on some models)",
    )
    parser.add_argument(
        "--mlp-layers", type=int, help=f"layers of the seed MLP (default {full.mlp_layers}; quick {quick.mlp_layers})"
    )
    parser.add_argument(
        "--large-params",
        type=int,
        help=f"elements of the one large tensor (default {full.large_params:,}; quick {quick.large_params:,})",
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved timing rounds (default {full.rounds})")
    parser.add_argument("--steps-per-round", type=int, help="train steps of each column per round")
    parser.add_argument(
        "--compile-max-tensors",
        type=int,
        help=f"largest model (tensors) the per-tensor compiled column runs on (default {full.compile_max_tensors})",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the first-fused-step measurement in fresh processes"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="bench_results", help="output folder (default bench_results)")


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from scratchopt.tools.bench import table
    from scratchopt.tools.bench.run import UnknownChoice, run_bench

    chosen = preset(args.preset)
    overrides = {
        "mlp_layers": args.mlp_layers,
        "large_params": args.large_params,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "compile_max_tensors": args.compile_max_tensors,
    }
    chosen = replace(chosen, **{key: value for key, value in overrides.items() if value is not None})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("scratchopt bench: --device cuda asked for, but torch sees no CUDA device")
    columns = _split(args.columns)
    shown = columns or preset_columns(chosen)
    try:
        results = run_bench(
            chosen,
            algorithms=_split(args.algorithms),
            workloads=_split(args.workloads),
            columns=columns,
            modes=_split(args.modes),
            device=args.device,
            threads=args.threads,
            warmup_compile=False if args.no_warmup else None,
            memory=not args.no_memory,
            row_done=lambda row: print(table.format_row(row, shown)),
        )
    except UnknownChoice as error:
        raise SystemExit(f"scratchopt bench: {error}") from None
    print(table.table(results))
    if results["compile_warmup"]:
        print("\n" + table.format_warmup(results))
    if results.get("resident_memory"):
        print("\n" + table.format_resident(results))
    print("\n" + table.format_targets(results))
    if results["left_out"]:
        print("\n" + table.format_left_out(results))
    print(f"\n{results['meta']['seconds']:.0f} s")
    for path in table.save(results, args.out):
        print(f"wrote {path}")
    return results
