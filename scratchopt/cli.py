"""The ``scratchopt`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scratchopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small MLP with every algorithm, ours beside torch's")
    demo.add_argument("--steps", type=int, default=100, help="full-batch training steps (default 100)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from scratchopt.demo import main as demo_main

        demo_main(steps=args.steps)


if __name__ == "__main__":
    main()
