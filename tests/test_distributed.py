"""Sampling sharded over processes: `torchrun --nproc_per_node 2` on CPU (gloo) writes the same
samples.parquet, byte for byte, as one process; a launch killed mid-shard resumes each rank
from its own finished parts; every rank returns the merged table."""
from __future__ import annotations

import io
import os
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


def _launch(tmp_path, args, nproc=None, module=False, **env):
    """Run SCRIPT (or, with `module`, `-m dualign.cli` as users launch it) with `args` as one plain
    process (nproc None) or under torch.distributed.run."""
    script = tmp_path / "launch.py"
    script.write_text(SCRIPT)
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
