"""`dualign mocan` / `pecan` under a distributed launch (torchrun, accelerate launch).

- π_ref loads on this rank's device (`dualign.parallel.rank_device`): cuda:LOCAL_RANK (the CPU
  without CUDA) instead of every rank piling onto the default GPU; one process keeps the
  default device. The real `load_policy` runs (tiny model); a wrapper records the device it was
  given and stops the pipeline right after, before sampling would wait for other ranks.
- `torchrun --nproc_per_node 2 -m dualign.cli mocan ... --until pairs` on the CPU (gloo) writes
  every file of those stages byte for byte as one process does: one process group serves all
  the stages (a group per stage failed at the third one).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dualign.pipelines import mocan, pecan
from dualign.pipelines.config import MoCANConfig, PeCANConfig

TOY = Path(__file__).with_name("toy_scorers.py")


class Loaded(Exception):
    """Raised once π_ref is loaded: the test has what it needs."""


def _record_load(monkeypatch, module):
    """Make `module.load_policy` (the real one) record its `device` and model, then stop the run."""
    real, seen = module.load_policy, {}

    def load_and_stop(spec, *args, **kwargs):
        seen["device"] = kwargs.get("device")
        seen["model"], _ = real(spec, *args, **kwargs)
        raise Loaded

    monkeypatch.setattr(module, "load_policy", load_and_stop)
    return seen


@pytest.fixture
def launch_env(monkeypatch, request):
    """Rank 0 of a 2-process launch on this machine (param True), or a plain process; yields the
    device π_ref should load on.

    The pipeline opens its process group before π_ref loads; with no second process here, a
    real one-member gloo group is set up first, which `process_group` then uses as it is (as it
    uses a group accelerate set up): the launcher's variables still say 2 ranks."""
    import torch
    import torch.distributed as dist

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    if not request.param:
        yield None
        return
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield "cuda:0" if torch.cuda.is_available() else "cpu"
    finally:
        dist.destroy_process_group()


def _prompts(tmp_path) -> str:
    p = tmp_path / "prompts.txt"
    p.write_text("hi\nhello there\n")
    return str(p)


@pytest.mark.parametrize("launch_env", [False, True], ids=["one process", "rank 0 of 2"], indirect=True)
def test_mocan_loads_the_policy_on_the_ranks_device(launch_env, tmp_path, monkeypatch, tiny_model_dir):
    expected = launch_env
    seen = _record_load(monkeypatch, mocan)
    cfg = MoCANConfig(out=str(tmp_path / "run"), policy=str(tiny_model_dir), reward=f"{TOY}:reward",
                      safety={"vowels": f"safety:{TOY}:safety"}, prompts=_prompts(tmp_path))
    with pytest.raises(Loaded):
        mocan.run_mocan(cfg, log=lambda *a: None)
    assert seen["device"] == expected
    if expected is not None:
        assert str(next(seen["model"].parameters()).device) == expected


@pytest.mark.parametrize("launch_env", [False, True], ids=["one process", "rank 0 of 2"], indirect=True)
def test_pecan_loads_the_policy_on_the_ranks_device(launch_env, tmp_path, monkeypatch, tiny_model_dir):
    expected = launch_env
    seen = _record_load(monkeypatch, pecan)
    # pre-aligned π_r and π_g given: the pre-align stage trains nothing and π_ref loads next
    cfg = PeCANConfig(out=str(tmp_path / "run"), policy=str(tiny_model_dir), prompts=_prompts(tmp_path),
                      helpful_model=str(tiny_model_dir), safety_models={"harmless": str(tiny_model_dir)},
                      pairs="samples")
    with pytest.raises(Loaded):
        pecan.run_pecan(cfg, log=lambda *a: None)
    assert seen["device"] == expected


# ----------------------------------------------------------------------------- a real 2-rank launch

PROMPTS = ["tell me a joke", "how do I pick a lock", "write a poem", "explain gravity",
           "how to hack wifi", "name a color"]
# files of the stages up to `pairs`, π_ref's held-out samples (taken after the dual) included
STAGE_FILES = ("samples.parquet", "scores.parquet", "dual.json", "pairs.parquet",
               "eval/reference/samples.parquet", "eval/reference/scores.parquet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, model_dir, name: str) -> Path:
    """A MoCAN config on the tiny model and toy scorers: 6 prompts × 4 samples in batches of 4
    (6 batches: 3 per rank), 2 held-out samples per prompt, pairs of π_ref's own samples."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = {"out": str(tmp_path / name), "policy": str(model_dir), "reward": f"{TOY}:reward",
           "safety": {"vowels": f"safety:{TOY}:safety"}, "prompts": str(prompts), "num_samples": 4,
           "max_new_tokens": 10, "sample_batch_size": 4, "bootstrap": 50, "eval_num_samples": 2,
           "train": {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _dualign(args, nproc: int | None = None) -> subprocess.CompletedProcess:
    """`python -m dualign.cli ARGS` as one process, or under torch.distributed.run with `nproc`
    ranks (gloo on the CPU), one thread each so both runs compute alike."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    return subprocess.run(cmd + ["-m", "dualign.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_ranks_run_the_stages_up_to_pairs_as_one_process(tmp_path, tiny_model_dir):
    one = _dualign(["mocan", "--config", _config(tmp_path, tiny_model_dir, "one"), "--until", "pairs"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _dualign(["mocan", "--config", _config(tmp_path, tiny_model_dir, "two"), "--until", "pairs"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in STAGE_FILES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

