"""Sampling sharded over processes: `torchrun --nproc_per_node 2` on CPU (gloo) writes the same
samples.parquet, byte for byte, as one process; a launch killed mid-shard resumes each rank
from its own finished parts; every rank returns the merged table."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from dualign.cli import main
from dualign.errors import InputError
from dualign.models.generation import PARTIAL_DIR, SAMPLES_FILE
from dualign.parallel import process_group, rank_device
from dualign.runio import dist_info

PROMPTS = ["hi", "hello there", "a longer prompt here, much longer", "x", "what now?"]
K, BATCH = 3, 2
N_BATCHES = -(-len(PROMPTS) * K // BATCH)  # 8: rank 0 runs batches 0, 2, 4, 6; rank 1 runs 1, 3, 5, 7

# The launched script: dualign's own CLI, with two test hooks. Each rank appends a line to
# log-rank{RANK}.txt per batch it generates; the rank named by DIE_RANK raises when it is
# about to write its second part (its first one is on disk), as if killed there.
SCRIPT = textwrap.dedent('''
    import os, sys
    from dualign import cli
    from dualign.models import generation

    rank = int(os.environ.get("RANK", "0"))
    log = os.path.join(os.environ["TEST_LOG_DIR"], f"log-rank{rank}.txt")
    real_generate, real_write = generation.generate_batch, generation.write_parquet

    def counted(*a, **k):
        with open(log, "a") as f:
            f.write("batch\\n")
        return real_generate(*a, **k)

    written = []

    def dies_before_second_part(df, path):
        if "batch-" in os.path.basename(str(path)):
            if written:
                raise RuntimeError(f"rank {rank} killed on purpose")
            written.append(path)
        return real_write(df, path)

    generation.generate_batch = counted
    if os.environ.get("DIE_RANK") == str(rank):
        generation.write_parquet = dies_before_second_part
    if sys.argv[1] == "library":  # no out_dir: the ranks exchange their parts in memory
        from dualign.models.loading import load_policy
        from dualign.parallel import rank_device
        model, tok = load_policy(sys.argv[2], device=rank_device(None))
        df = generation.sample(model, tok, sys.argv[3].split("|"), num_samples=3, max_new_tokens=10,
                               seed=3, batch_size=2, model_name="tiny", progress=False)
        df.to_parquet(os.path.join(sys.argv[4], f"returned-rank{rank}.parquet"))
        sys.exit(0)
    sys.exit(cli.main(sys.argv[1:]))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, args, nproc=None, module=False, script_text=SCRIPT, **env):
    """Run `script_text` (or, with `module`, `-m dualign.cli` as users launch it) with `args` as one
    plain process (nproc None) or under torch.distributed.run."""
    script = tmp_path / "launch.py"
    script.write_text(script_text)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    for f in logs.glob("*"):
        f.unlink()
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    child_env.update(OMP_NUM_THREADS="1", TEST_LOG_DIR=str(logs), CUDA_VISIBLE_DEVICES="", **env)
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    target = ["-m", "dualign.cli"] if module else [str(script)]
    proc = subprocess.run(cmd + [*target, *map(str, args)], env=child_env, capture_output=True,
                          text=True, timeout=120)
    counts = {int(f.stem.removeprefix("log-rank")): len(f.read_text().splitlines()) for f in logs.glob("log-rank*.txt")}
    return proc, counts


def _sample_args(model_dir, prompts_file, out):
    return ["sample", "--model", model_dir, "--prompts", prompts_file, "--num-samples", K,
            "--max-new-tokens", 10, "--seed", 3, "--batch-size", BATCH, "--out", out, "--no-progress"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, prompts_file):
    """samples.parquet of a plain one-process run (the same CLI, the same thread count)."""
    tmp = tmp_path_factory.mktemp("one")
    proc, counts = _launch(tmp, _sample_args(tiny_model_dir, prompts_file, tmp / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {0: N_BATCHES}
    return (tmp / "run" / SAMPLES_FILE).read_bytes()


def test_two_ranks_write_the_one_process_file(tmp_path, tiny_model_dir, prompts_file, one_process):
    # the launch line of the README: torchrun ... -m dualign.cli sample ...
    proc, _ = _launch(tmp_path, _sample_args(tiny_model_dir, prompts_file, tmp_path / "run"), nproc=2,
                      module=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / SAMPLES_FILE).read_bytes() == one_process
    assert not (tmp_path / "run" / PARTIAL_DIR).exists()
    assert proc.stdout.count("wrote ") == 1  # rank 0 speaks for the run
    df = pd.read_parquet(tmp_path / "run" / SAMPLES_FILE)
    assert df[["prompt_id", "sample_id"]].values.tolist() == [[p, k] for p in range(len(PROMPTS)) for k in range(K)]


def test_killed_rank_resumes_from_its_own_parts(tmp_path, tiny_model_dir, prompts_file, one_process):
    run = tmp_path / "run"
    args = _sample_args(tiny_model_dir, prompts_file, run)
    proc, _ = _launch(tmp_path, args, nproc=2, DIE_RANK="1")
    assert proc.returncode != 0 and "rank 1 killed on purpose" in proc.stderr
    assert not (run / SAMPLES_FILE).exists()
    done = sorted(int(f.stem.split("-")[1]) for f in (run / PARTIAL_DIR).glob("batch-*.parquet"))
    assert [b for b in done if b % 2 == 1] == [1]  # rank 1 got its first part on disk, then died
    assert [b for b in done if b % 2 == 0], "rank 0 finished no part before the launcher stopped it"

    proc, counts = _launch(tmp_path, args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank generated only its batches that had no part yet
    for r in (0, 1):
        assert counts.get(r, 0) == sum(1 for b in range(r, N_BATCHES, 2) if b not in done)
    assert (run / SAMPLES_FILE).read_bytes() == one_process


def test_every_rank_returns_the_merged_table_without_out_dir(tmp_path, tiny_model_dir, one_process):
    proc, counts = _launch(tmp_path, ["library", tiny_model_dir, "|".join(PROMPTS), tmp_path], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {0: N_BATCHES // 2, 1: N_BATCHES // 2}  # each rank ran its half, no more
    ref = pd.read_parquet(io.BytesIO(one_process))
    for r in (0, 1):
        got = pd.read_parquet(tmp_path / f"returned-rank{r}.parquet")
        pd.testing.assert_frame_equal(got.drop(columns="model"), ref.drop(columns="model"))


# ----------------------------------------------------------------------------- in-process checks

def test_dist_info_reads_the_launcher_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_info() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK=4"):
        dist_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="RANK='x'"):
        dist_info()


def test_world_of_one_needs_no_torch_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as g:
        assert (g.rank, g.world_size, g.distributed) == (0, 1, False)
        g.barrier()
        assert g.broadcast("x") == "x" and g.gather({1: 2}) == [{1: 2}]
    assert rank_device(None) is None and rank_device("auto") == "auto"


def test_rank_device_under_a_launch(monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device(None) == "cpu" and rank_device("cuda") == "cpu" and rank_device("cpu") == "cpu"
    with pytest.raises(InputError, match="device"):
        rank_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(None) == "cuda:1" and rank_device("cuda:0") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="LOCAL_RANK=1"):
        rank_device(None)


def test_cli_refuses_vllm_under_a_launch(monkeypatch, tmp_path, prompts_file, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["sample", "--model", "/nonexistent/model", "--prompts", str(prompts_file), "--backend", "vllm",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vllm backend is not sharded" in err


# ----------------------------------------------------------------------------- scoring and log-probs

# The launched script for `dualign score` / `dualign logprobs`, with test hooks: each rank appends
# a line to log-rank{RANK}.txt per score part it writes and per log-prob batch it runs, and keeps
# what `score_samples` / `logprobs` returned to it; the rank named by DIE_RANK raises when it is
# about to write its second score part (its first one is on disk), as if killed there.
SCORE_SCRIPT = textwrap.dedent('''
    import os, sys
    import numpy as np
    from dualign import cli
    from dualign.models import logprobs as lp_module
    from dualign.pipelines import scoring

    rank = int(os.environ.get("RANK", "0"))
    logs = os.environ["TEST_LOG_DIR"]
    real_write, real_pad = scoring.write_parquet, lp_module.pad_pairs
    real_logprobs, real_score = lp_module.logprobs, scoring.score_samples

    def note(line):
        with open(os.path.join(logs, f"log-rank{rank}.txt"), "a") as f:
            f.write(line + "\\n")

    written = []

    def part_writer(df, path):
        if os.path.basename(str(path)).startswith("part-"):
            if os.environ.get("DIE_RANK") == str(rank) and written:
                raise RuntimeError(f"rank {rank} killed on purpose")
            written.append(path)
            note(f"part {path}")
        return real_write(df, path)

    def counted_pad(*a, **k):
        note("batch")
        return real_pad(*a, **k)

    def kept_logprobs(*a, **k):
        lp, n = real_logprobs(*a, **k)
        np.save(os.path.join(logs, f"logp-rank{rank}.npy"), lp)
        return lp, n

    def kept_scores(*a, **k):
        table = real_score(*a, **k)
        table.to_parquet(os.path.join(logs, f"scores-rank{rank}.parquet"))
        return table

    scoring.write_parquet, lp_module.pad_pairs = part_writer, counted_pad
    lp_module.logprobs, scoring.score_samples = kept_logprobs, kept_scores
    if sys.argv[1] == "columns":  # the pipelines' way: logprob_columns, twice
        from dualign.models.loading import load_policy
        from dualign.parallel import rank_device
        model = scoring.LogProbModel("ref", "tiny", lambda: load_policy(sys.argv[2], device=rank_device(None)))
        from dualign.parallel import process_group
        with process_group():  # one group around both calls, as a pipeline holds one for its run
            for _ in range(2):  # the second call finds the column current, on every rank
                scoring.logprob_columns([sys.argv[3]], [model], batch_size=int(sys.argv[4]))
        sys.exit(0)
    sys.exit(cli.main(sys.argv[1:]))
''')

N_ROWS, SCORE_BATCH = 128, 2
# scoring.PART_BATCHES (16) batches of 2 rows a part: 4 parts a column; rank 0 scores parts 0
# and 2, rank 1 parts 1 and 3
N_PARTS = N_ROWS // (SCORE_BATCH * 16)
LOGP_BATCH = 4  # 32 log-prob batches, 16 a rank


@pytest.fixture(scope="module")
def scoring_inputs(tmp_path_factory):
    """A samples table of varied lengths (some truncated), a tiny random sequence-classification
    reward model, and a toy safety function file, at fixed paths (the specs are in the output)."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from conftest import make_tiny_tokenizer
    from dualign.runio import write_parquet

    d = tmp_path_factory.mktemp("scoring-inputs")
    rng = np.random.default_rng(0)
    words = ["lock", "cat", "please", "no", "sure, here is how", "I can't help with that", "é"]
    samples = pd.DataFrame({
        "prompt_id": np.repeat(np.arange(N_ROWS // 4), 4), "sample_id": np.tile(np.arange(4), N_ROWS // 4),
        "prompt": [f"prompt {i // 4}: " + "why " * (i // 4 % 7) for i in range(N_ROWS)],
        "response": [" ".join(rng.choice(words, size=int(rng.integers(0, 12)))) for _ in range(N_ROWS)],
        "n_tokens": np.int64(5), "truncated": rng.random(N_ROWS) < 0.25})
    write_parquet(samples, d / "samples.parquet")
    tok = make_tiny_tokenizer()
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1)
    LlamaForSequenceClassification(cfg).eval().save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    (d / "toy.py").write_text("def length(p, y):\n    return [0.5 * len(r) - len(q) for q, r in zip(p, y)]\n")
    return d


def _score_args(inputs, run):
    run.mkdir(parents=True, exist_ok=True)
    samples = run / "samples.parquet"
    if not samples.exists():
        shutil.copy(inputs / "samples.parquet", samples)
    return ["score", "--samples", samples, "--reward", f"reward:{inputs / 'rm'}",
            "--safety", f"len=safety:{inputs / 'toy.py'}:length", "--batch-size", SCORE_BATCH]


@pytest.fixture(scope="module")
def one_process_scores(tmp_path_factory, scoring_inputs):
    """scores.parquet of a plain one-process `dualign score` (the same script, the same threads)."""
    tmp = tmp_path_factory.mktemp("one-score")
    proc, counts = _launch(tmp, _score_args(scoring_inputs, tmp / "run"), script_text=SCORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {0: 2 * N_PARTS}  # two columns
    return (tmp / "run" / "scores.parquet").read_bytes()


def test_two_ranks_score_into_the_one_process_file(tmp_path, scoring_inputs, one_process_scores):
    proc, counts = _launch(tmp_path, _score_args(scoring_inputs, tmp_path / "run"), nproc=2,
                           script_text=SCORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {0: N_PARTS, 1: N_PARTS}  # each rank scored its half of each column, no more
    # the same bytes: each part was scored in the batches one process scores it in
    assert (tmp_path / "run" / "scores.parquet").read_bytes() == one_process_scores
    assert not (tmp_path / "run" / "scores.partial").exists()
    assert proc.stdout.count("wrote ") == 1  # rank 0 speaks for the run
    ref = pd.read_parquet(io.BytesIO(one_process_scores))
    assert ref["reward"].nunique() > N_ROWS // 2  # a real model's scores, not a constant
    for r in (0, 1):  # every rank returns the merged table
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "logs" / f"scores-rank{r}.parquet"), ref)


def test_a_killed_scoring_rank_resumes_its_own_parts(tmp_path, scoring_inputs, one_process_scores):
    run = tmp_path / "run"
    args = _score_args(scoring_inputs, run)
    proc, _ = _launch(tmp_path, args, nproc=2, script_text=SCORE_SCRIPT, DIE_RANK="1")
    assert proc.returncode != 0 and "rank 1 killed on purpose" in proc.stderr
    assert not (run / "scores.parquet").exists()
    stored = list((run / "scores.partial").glob("*/part-*.parquet"))
    assert len({p.parent for p in stored}) == 1  # the reward column only
    done = sorted(int(p.stem.split("-")[1]) for p in stored)
    assert [i for i in done if i % 2 == 1] == [1]  # rank 1 got its first part on disk, then died

    proc, counts = _launch(tmp_path, args, nproc=2, script_text=SCORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank scored only its reward parts that had no file yet, then its half of the safety
    for r in (0, 1):
        assert counts.get(r, 0) == sum(1 for i in range(r, N_PARTS, 2) if i not in done) + N_PARTS // 2
    assert f"resuming, {len(done)} of {N_PARTS} parts already scored" in proc.stdout
    assert (run / "scores.parquet").read_bytes() == one_process_scores
    assert not (run / "scores.partial").exists()


def _logprob_args(model_dir, inputs, run):
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(inputs / "samples.parquet", run / "samples.parquet")
    return ["logprobs", "--model", model_dir, "--samples", run / "samples.parquet", "--name", "ref",
            "--batch-size", LOGP_BATCH, "--no-progress"]


def test_two_ranks_compute_the_one_process_logprobs(tmp_path, tiny_model_dir, scoring_inputs):
    import numpy as np

    one = tmp_path / "one"
    one.mkdir()
    proc, counts = _launch(one, _logprob_args(tiny_model_dir, scoring_inputs, one / "run"),
                           script_text=SCORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_batches = N_ROWS // LOGP_BATCH
    assert counts == {0: n_batches}
    want = np.load(one / "logs" / "logp-rank0.npy")

    proc, counts = _launch(tmp_path, _logprob_args(tiny_model_dir, scoring_inputs, tmp_path / "run"),
                           nproc=2, script_text=SCORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {0: n_batches // 2, 1: n_batches // 2}  # the batches were shared out
    # exactly equal, not close: each row is computed in the batch one process puts it in
    for r in (0, 1):
        assert np.array_equal(np.load(tmp_path / "logs" / f"logp-rank{r}.npy"), want)
    assert (tmp_path / "run" / "scores.parquet").read_bytes() == (one / "run" / "scores.parquet").read_bytes()
    assert proc.stdout.count("wrote ") == 1
    got = pd.read_parquet(tmp_path / "run" / "scores.parquet")["logp/ref"].to_numpy()
    assert np.all(got <= 0) and len(np.unique(got)) > N_ROWS // 2  # 0: an empty truncated answer

    # the pipelines' path (PeCAN, the KL estimates): the same numbers, rank 0 writes, a second
    # call computes nothing on any rank
    cols = tmp_path / "cols"
    cols.mkdir()
    shutil.copy(scoring_inputs / "samples.parquet", cols / "samples.parquet")
    proc, counts = _launch(tmp_path, ["columns", tiny_model_dir, cols / "samples.parquet", LOGP_BATCH], nproc=2,
                           script_text=SCORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {0: n_batches // 2, 1: n_batches // 2}
    assert proc.stdout.count("logp/ref for") == 1
    assert np.array_equal(pd.read_parquet(cols / "scores.parquet")["logp/ref"].to_numpy(), want)
