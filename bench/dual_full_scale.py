"""Benchmark: `dualign dual` on a score file of the paper's full scale, as a user runs it.

    .venv/bin/python bench/dual_full_scale.py [--scale 0.1] [--dir DIR] [--full-boot B] [--no-full]

Writes once (cached in --dir, default /tmp/dualign-bench) a Parquet score table of
30k prompts × 128 samples = 3.84 M rows (times --scale prompts) shaped like what `dualign
sample` + `dualign score` write: prompt_id, sample_id, prompt and response text of a few
hundred characters, n_tokens, reward and safety (dualign.data.scores.synthetic_scores).
Then runs `dualign dual FILE` in a fresh process with the default settings (1,000 one-step
bootstrap replicates) and reports its wall time and peak memory (max RSS, from
getrusage(RUSAGE_CHILDREN) of a wrapper process that runs only that command), counting
everything from the command's start: interpreter start, imports, reading, solving,
bootstrap, dual.json. Side by side: the same command with `--bootstrap-method full` at 1
and at B replicates (--full-boot, default 20), extrapolated linearly to 1,000
replicates, and the ratio. Target (issue 14): < 20 s and < 2 GB at full scale.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_PROMPTS, K = 30_000, 128

# Runs one command and prints {"wall_s", "max_rss_kb", "rc"} as the last line of stderr:
# a process of its own, so RUSAGE_CHILDREN holds this command's peak alone.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "rc": rc}), file=sys.stderr)
"""


def _sentences(rng, n: int) -> list[str]:
    """n pseudo-English sentences of 40-120 characters from a fixed vocabulary."""
    vocab = ["the", "a", "model", "answer", "safety", "request", "please", "explain", "how", "why",
             "cannot", "help", "with", "that", "here", "is", "step", "first", "then", "finally",
             "information", "dangerous", "useful", "recipe", "chemistry", "history", "story", "write",
             "code", "python", "function", "returns", "value", "policy", "guidelines", "sorry", "sure",
             "example", "consider", "important", "note", "however", "because", "people", "might",
             "should", "would", "could", "never", "always", "detail", "simple", "question", "topic"]
    words = np.array(vocab)
    out = []
    for _ in range(n):
        w = words[rng.integers(0, len(words), size=rng.integers(7, 20))]
        out.append((" ".join(w)).capitalize() + ".")
    return out


def write_scores(path: Path, n_prompts: int, k: int, seed: int = 0) -> None:
    """The score table, written in row groups of 1,000 prompts so text is never all in memory."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dualign.data.scores import synthetic_scores

    rng = np.random.default_rng(seed)
    pool = pa.array(_sentences(rng, 20_000))
    scores = synthetic_scores(n_prompts=n_prompts, k=k, seed=seed)
    tmp = path.with_suffix(".tmp")
    writer = None
    step = 1000
    for a in range(0, n_prompts, step):
        b = min(n_prompts, a + step)
        rows = slice(a * k, b * k)
        n = (b - a) * k
        prompt_text = pc.binary_join_element_wise(pool.take(rng.integers(0, len(pool), b - a)),
                                                  pool.take(rng.integers(0, len(pool), b - a)), " ")
        response = pc.binary_join_element_wise(*[pool.take(rng.integers(0, len(pool), n)) for _ in range(4)], " ")
        table = pa.table({
            "prompt_id": scores["prompt_id"].to_numpy()[rows],
            "sample_id": scores["sample_id"].to_numpy()[rows],
            "prompt": prompt_text.take(np.repeat(np.arange(b - a), k)),
            "response": response,
            "n_tokens": pc.divide(pc.utf8_length(response), 4),
            "reward": scores["reward"].to_numpy()[rows],
            "safety": scores["safety"].to_numpy()[rows],
        })
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    writer.close()
    tmp.replace(path)


def measure(cmd: list[str]) -> dict:
    """Wall time (s), peak RSS (GB) and exit code of `cmd` run in a fresh wrapper process."""
    p = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], stderr=subprocess.PIPE, text=True, check=False)
    lines = p.stderr.strip().splitlines()
    r = json.loads(lines[-1])
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r['rc']}):\n" + "\n".join(lines[:-1][-20:]))
    return {"wall_s": r["wall_s"], "peak_gb": r["max_rss_kb"] * 1024 / 1e9}


def compare(path: Path, n_boot: int) -> None:
    """One-step against full re-solve on the file's scores, the same `n_boot` resamples."""
    from dualign.data.scores import read_score_arrays
    from dualign.dual import bootstrap_dual

    a = read_score_arrays(path)
    t = time.perf_counter()
    one = bootstrap_dual(a.reward, a.safety, 0.1, 0.0, n_boot=n_boot, method="one_step")
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    full = bootstrap_dual(a.reward, a.safety, 0.1, 0.0, n_boot=n_boot, method="full")
    t_full = time.perf_counter() - t
    print(f"in-process, {n_boot} replicates (same resamples): one-step {t_one:.2f} s, full {t_full:.1f} s; "
          f"one-step re-solved {one.n_resolved}")
    for key in full.ci:
        width = full.ci[key][:, 1] - full.ci[key][:, 0]
        err = np.abs(one.ci[key] - full.ci[key]).max(axis=1)
        # an active constraint's gain is its margin in every replicate: width 0 up to rounding
        rel = ", ".join(f"width 0, gap {e:.1g}" if w <= 1e-9 else f"{100 * e / w:.2g}%" for e, w in zip(err, width))
        print(f"  {key:<12} full {np.round(full.ci[key], 5).tolist()}  one-step {np.round(one.ci[key], 5).tolist()}"
              f"  endpoint gap / width: {rel}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 30k prompts (default 1)")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "dualign-bench"),
                    help="where the score file is cached")
    ap.add_argument("--full-boot", type=int, default=20, help="replicates of the full-bootstrap run (default 20)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-bootstrap runs")
    ap.add_argument("--compare", type=int, default=0, metavar="B",
                    help="also bootstrap the file's scores in-process both ways with B replicates (same "
                         "resamples) and print how far the one-step intervals are from the full ones")
    args = ap.parse_args()

    n = max(2, round(N_PROMPTS * args.scale))
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"scores_{n}x{K}.parquet"
    if not path.exists():
        t = time.perf_counter()
        write_scores(path, n, K)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s")
    print(f"score file: {path} ({n * K:,} rows = {n:,} prompts × {K} samples, "
          f"{path.stat().st_size / 1e6:.0f} MB on disk, with prompt and response text)")

    exe = Path(sys.executable).with_name("dualign")
    base = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                            "import sys; from dualign.cli import main; sys.exit(main())"]
    exe = Path(sys.executable).with_name("dualign")
    base = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                            "import sys; from dualign.cli import main; sys.exit(main())"]
    with tempfile.TemporaryDirectory() as out:
        one = measure(base + ["dual", str(path), "--out", f"{out}/one.json"])
        rec = json.loads(Path(f"{out}/one.json").read_text())
        b = rec["bootstrap"]
        print(f"\n`dualign dual` (defaults: {b['n_boot']} bootstrap replicates, method {b.get('method', 'full')}, "
              f"{b.get('n_resolved', 0)} re-solved):")
        print(f"  wall {one['wall_s']:.2f} s   peak RSS {one['peak_gb']:.2f} GB   "
              f"λ* = {rec['lambda']}  λ CI = {rec['constraints'][0]['lambda_ci']}")
        if not args.no_full:
            B = args.full_boot
            f1 = measure(base + ["dual", str(path), "--bootstrap-method", "full", "--bootstrap", "1",
                                 "--out", f"{out}/f1.json"])
            fb = measure(base + ["dual", str(path), "--bootstrap-method", "full", "--bootstrap", str(B),
                                 "--out", f"{out}/fb.json"])
            per_rep = (fb["wall_s"] - f1["wall_s"]) / (B - 1)
            full_all = f1["wall_s"] + per_rep * (b["n_boot"] - 1)
            print(f"`dualign dual --bootstrap-method full`: 1 replicate {f1['wall_s']:.2f} s, {B} replicates "
                  f"{fb['wall_s']:.2f} s (peak {fb['peak_gb']:.2f} GB) → {per_rep:.3f} s per replicate, "
                  f"{b['n_boot']} replicates ≈ {full_all:.0f} s (extrapolated)")
            print(f"  speed-up of the default over the full bootstrap at {b['n_boot']} replicates: "
                  f"{full_all / one['wall_s']:.0f}x (whole command); the bootstrap alone ≈ "
                  f"{per_rep * b['n_boot']:.0f} s vs {max(one['wall_s'] - f1['wall_s'] + per_rep, 1e-3):.2f} s")
    if args.compare:
        compare(path, args.compare)


if __name__ == "__main__":
    main()
