"""The `dualign` command. One subcommand per pipeline stage; each is `_add_<name>` (its flags)
plus `cmd_<name>` (what it does). Errors meant for the user print as one line, exit code 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DualignError


def _add_dual(sub):
    p = sub.add_parser("dual", help="solve the dual on scored reference samples (λ*, predictions, CIs)",
                       description="Solve CAN's dual on a long-format score table (one row per prompt × "
                                   "sample): λ*, predicted reward/safety gains with bootstrap CIs, KL, ESS.")
    p.add_argument("scores", help="Parquet, CSV or JSONL with prompt_id, reward and safety columns")
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient β (default 0.1)")
    p.add_argument("--margin", type=float, action="append", dest="margins", metavar="M",
                   help="required safety gain over the reference; once, or once per --safety column")
    p.add_argument("--reward", default="reward", metavar="COL", help="reward column (default: reward)")
    p.add_argument("--safety", action="append", metavar="COL",
                   help="safety column (higher = safer); repeat for several constraints "
                        "(default: 'safety', else every 'safety/<name>' column)")
    p.add_argument("--prompt-id", default="prompt_id", metavar="COL")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap replicates (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", help="write dual.json here")
    p.add_argument("--plot", metavar="DIR", help="write the three figures (PNG) into DIR")
    p.set_defaults(func=cmd_dual)
    return p


def cmd_dual(args) -> int:
    from .data.scores import read_score_arrays
    from .pipelines.dual_stage import format_dual_summary, solve_dual_stage, write_dual_outputs
    from .runio import file_digest

    scores = read_score_arrays(args.scores, args.reward, args.safety, args.prompt_id)
    margins = _margins_for(args.margins, scores.safety_names)
    d = solve_dual_stage(scores, args.beta, margins, n_boot=args.bootstrap, level=args.level,
                         seed=args.seed, inputs={"scores_file": str(args.scores),
                                                 "scores_file_digest": file_digest(args.scores)})
    print(format_dual_summary(d))
    for path in write_dual_outputs(d, scores, args.out, args.plot):
        print(f"wrote {path}")
    return 0


def _margins_for(margins, names):
    from .errors import InputError

    margins = margins or [0.0]
    if len(margins) == 1:
        return margins * len(names)
    if len(margins) != len(names):
        raise InputError(f"{len(margins)} --margin values for {len(names)} safety columns "
                         f"({', '.join(names)}): give one, or one per column", field="--margin")
    return margins


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the main job on the embedded default (the README's first command)")
    p.add_argument("--dual-only", action="store_true",
                   help="only the dual, on the bundled synthetic score file (needs no model)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: a fresh folder under runs/)")
    p.add_argument("--margin", type=float, default=None, help="safety margin (default: half the largest achievable)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="shrink everything for a smoke run")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    return _dual_demo(args)


def _dual_demo(args) -> int:
    import numpy as np

    from .data.scores import read_score_arrays
    from .pipelines.dual_stage import format_dual_summary, solve_dual_stage, write_dual_outputs
    from .dual import DualProblem
    from .runio import new_run_dir

    src = Path(__file__).parent / "data" / "demo" / "synthetic_scores.csv"
    run = new_run_dir(args.out, "dual-demo")
    print(f"dualign demo (dual only): SYNTHETIC scores from {src.name} (200 prompts x 16 samples,")
    print("  drawn by dualign.data.scores.synthetic_scores; no model involved)\n")
    scores = read_score_arrays(src)
    max_gain = DualProblem(scores.reward, scores.safety, args.beta).max_gain()
    margin = args.margin if args.margin is not None else float(np.round(0.5 * max_gain[0], 3))
    print(f"largest achievable safety gain on these samples: {max_gain[0]:.3f}; margin asked: {margin:g}\n")
    d = solve_dual_stage(scores, args.beta, [margin], n_boot=200 if args.quick else 1000,
                         inputs={"scores_file": src.name})
    print(format_dual_summary(d))
    written = write_dual_outputs(d, scores, run / "dual.json", run / "figures")
    print(f"\nartifacts in {run}/: " + ", ".join(str(p.relative_to(run)) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualign", description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dualign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_dual, _add_demo):
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
