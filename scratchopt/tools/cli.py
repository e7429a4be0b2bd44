"""The ``scratchopt`` command: ``demo``, ``report`` and ``bench``.

Only the options are defined here; each command's modules (the report's sections, the benchmark's
measurements, the demo's data) are imported when that command runs, so ``scratchopt --help`` imports
none of them.
"""

from __future__ import annotations

import argparse
import importlib.util

import scratchopt
from scratchopt.tools.presets import ALIASES, PRESETS

#: What ``scratchopt report``, ``bench`` and ``demo`` need besides torch: the ``report`` extra.
REPORT_EXTRA = ("numpy", "matplotlib", "sklearn", "tqdm")
DESCRIPTION = (
    "scratchopt's optimizers beside torch.optim: a short side-by-side training run (demo), an HTML report "
    "that re-runs the seed articles' experiments and checks every algorithm against its torch twin (report), "
    "and the optimizer step timed inside a real training loop for every strategy (bench)."
)


def require_report_extra(command: str) -> None:
    """Stop with a message naming the extra when one of its packages is missing (the optimizers need none)."""
    missing = [name for name in REPORT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"scratchopt {command} needs {', '.join(missing)}, which the optimizers do not: "
            "install them with: pip install 'scratchopt[report]'"
        )


def parser() -> argparse.ArgumentParser:
    from scratchopt.tools.bench.cli import add_arguments as add_bench_arguments

    top = argparse.ArgumentParser(prog="scratchopt", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"scratchopt {scratchopt.__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="{demo,report,bench}")
    demo = commands.add_parser(
        "demo", help="train a small MLP with every algorithm that has a torch twin, ours beside torch's"
    )
    demo.add_argument("--steps", type=int, default=100, help="full-batch training steps (default 100)")
    report = commands.add_parser("report", help="write an HTML report (figures, tables, results.json) to --out")
    report.add_argument("--out", default="report", help="output folder (default: report)")
    report.add_argument(
        "--preset",
        choices=sorted([*PRESETS, *ALIASES]),
        default="full",
        help="full (the default; a few minutes) or quick (well under a minute, for tests)",
    )
    bench = commands.add_parser("bench", help="median optimizer-step times: every strategy beside torch.optim")
    add_bench_arguments(bench)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    require_report_extra(args.command)
    if args.command == "bench":
        from scratchopt.tools.bench.cli import main as bench_main

        bench_main(args)
    elif args.command == "demo":
        from scratchopt.tools.demo import main as demo_main

        demo_main(steps=args.steps)
    elif args.command == "report":
        from scratchopt.tools.presets import preset
        from scratchopt.tools.report.build import build_report

        results = build_report(args.out, preset=preset(args.preset).name)
        print(f"wrote {args.out}/index.html and {args.out}/results.json in {results['meta']['build_seconds']:.0f} s")


if __name__ == "__main__":
    main()
