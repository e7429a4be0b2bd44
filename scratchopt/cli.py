"""The ``scratchopt`` command."""

from __future__ import annotations

import argparse
import importlib.util

from scratchopt.report.presets import PRESETS

#: What ``scratchopt report``, ``bench`` and ``demo`` need besides torch: the ``report`` extra.
REPORT_EXTRA = ("numpy", "matplotlib", "sklearn", "tqdm")


def require_report_extra(command: str) -> None:
    """Stop with a message naming the extra when one of its packages is missing (the optimizers need none)."""
    missing = [name for name in REPORT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"scratchopt {command} needs {', '.join(missing)}, which the optimizers do not: "
                         "install them with: pip install 'scratchopt[report]'")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scratchopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small MLP with every algorithm, ours beside torch's")
    demo.add_argument("--steps", type=int, default=100, help="full-batch training steps (default 100)")
    report = commands.add_parser("report", help="write an HTML report (figures, tables, results.json) to --out")
    report.add_argument("--out", default="report", help="output folder (default: report)")
    report.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="full (default; a few minutes) or quick (well under a minute, for tests)")
    bench = commands.add_parser("bench", help="median optimizer-step times: every strategy beside torch.optim")
    from scratchopt.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    args = parser.parse_args(argv)
    require_report_extra(args.command)
    if args.command == "bench":
        from scratchopt.bench import main as bench_main

        bench_main(args)
    elif args.command == "demo":
        from scratchopt.demo import main as demo_main

        demo_main(steps=args.steps)
    elif args.command == "report":
        from scratchopt.report.build import build_report

        results = build_report(args.out, preset=args.preset)
        print(f"wrote {args.out}/index.html and {args.out}/results.json "
              f"in {results['meta']['build_seconds']:.0f} s")


if __name__ == "__main__":
    main()
