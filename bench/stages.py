"""Where the demo's time goes: one `dualign demo` run, its wall time split by stage.

    .venv/bin/python bench/stages.py [--quick] [--pecan] [--cold] [--retrain-scorers] [--out DIR]

Runs the demo pipeline in a fresh run directory and prints each stage's seconds and share
(from the run's `timings.json`, written by the pipeline itself), plus the demo's scorer
set-up (reward and cost heads: the package ships them and the first run copies them into the
cache; `--retrain-scorers` trains them, about 4 minutes). `--cold` also uses an empty model
cache (`DUALIGN_CACHE` in a temporary directory): the embedded model is converted and the
scorers installed, as on a fresh machine. Run it alone: a second heavy process on the
two cores slows both several times over.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick demo (minutes)")
    ap.add_argument("--pecan", action="store_true", help="the PeCAN demo instead of MoCAN")
    ap.add_argument("--cold", action="store_true", help="empty model and scorer cache")
    ap.add_argument("--retrain-scorers", action="store_true", help="train the demo heads instead of the shipped ones")
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary one)")
    args = ap.parse_args()
    if args.cold:
        os.environ["DUALIGN_CACHE"] = tempfile.mkdtemp(prefix="dualign-cold-cache-")
    from dualign.pipelines.demo import demo_config, pecan_demo_config
    from dualign.pipelines.mocan import run_mocan
    from dualign.pipelines.pecan import run_pecan
    from dualign.pipelines.run import StageClock

    out = Path(args.out or tempfile.mkdtemp(prefix="dualign-bench-stages-"))
    t0 = time.perf_counter()
    make, run = (pecan_demo_config, run_pecan) if args.pecan else (demo_config, run_mocan)
    if args.retrain_scorers:
        from dualign.train.demo_scorers import demo_scorers

        demo_scorers(retrain=True)
    cfg = make(out, quick=args.quick)
    setup = time.perf_counter() - t0
    run(cfg)
    total = time.perf_counter() - t0
    seconds = {"scorer set-up": setup, **json.loads((out / StageClock.FILE).read_text())["seconds"]}
    print(f"\n{'pecan' if args.pecan else 'mocan'} demo{' (quick)' if args.quick else ''}"
          f"{', cold cache' if args.cold else ''}: {total:.0f} s wall ({total / 60:.1f} min), run in {out}")
    print(f"  {'stage':<15}{'seconds':>9}{'share':>8}")
    for name, s in seconds.items():
        print(f"  {name:<15}{s:>9.1f}{s / total:>8.0%}")
    rest = total - sum(seconds.values())
    print(f"  {'(model loads)':<15}{rest:>9.1f}{rest / total:>8.0%}")


if __name__ == "__main__":
    main()
