"""The `dualign` command. One subcommand per pipeline stage; each is `_add_<name>` (its flags)
plus `cmd_<name>` (what it does). Errors meant for the user print as one line, exit code 2."""
from __future__ import annotations

import argparse
import sys

from .errors import DualignError


def _add_dual(sub):
    p = sub.add_parser("dual", help="solve the dual on scored reference samples (λ*, predictions, CIs)")
    p.set_defaults(func=cmd_dual)
    return p


def cmd_dual(args) -> int:
    raise NotImplementedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualign", description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dualign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_dual,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DualignError as e:
        print(f"dualign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dualign {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
