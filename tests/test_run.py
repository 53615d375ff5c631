"""`Run`, the skeleton of a pipeline call: settings and stage names checked before the folder
exists, the stage window (`start` forces, `stop` ends the block), config.json and timings.json,
the lock held for the whole block and released after it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dualign.errors import InputError
from dualign.pipelines.config import MoCANConfig
from dualign.pipelines.run import Run
from dualign.pipelines.stages import STAGES


def _cfg(tmp_path, **kw):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n")
    return MoCANConfig(out=str(tmp_path / "run"), prompts=str(prompts), reward="r.py:reward",
                       safety={"harm": "safety:s.py:harm"}, **kw)


def _lock_free(folder) -> bool:
    """Whether another process can take the folder's run lock (within this one it is re-entrant)."""
    code = "import sys\nfrom dualign.runio import run_lock\nwith run_lock(sys.argv[1]):\n    pass\n"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


def _recipe(cfg, start=None, stop=None):
    """A recipe with the shape of run_mocan: which stages began, and each one's force flag."""
    began = []
    with Run(cfg, STAGES, start, stop, log=lambda *a: None) as run:
        for name in STAGES:
            run.begin(name, f"[{name}]")
            began.append((name, run.force(name)))
    return run.dir, began


def test_the_stage_window_forces_from_start_and_ends_after_stop(tmp_path):
    cfg = _cfg(tmp_path)
    run, began = _recipe(cfg, start="dual", stop="train")
    assert began == [("sample", False), ("score", False), ("dual", True), ("pairs", True), ("train", True)]
    assert list(json.loads((run / "timings.json").read_text())["seconds"]) == [n for n, _ in began]
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    _, began = _recipe(cfg)
    assert began == [(n, False) for n in STAGES]


def test_settings_and_stage_names_are_checked_before_the_folder_exists(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        _recipe(_cfg(tmp_path), stop="trian")
    with pytest.raises(InputError, match="beta"):
        _recipe(_cfg(tmp_path, beta=0.0))
    assert not (tmp_path / "run").exists()


def test_an_error_inside_the_block_propagates_and_releases_the_lock(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="in the score stage"):
        with Run(cfg, STAGES, log=lambda *a: None) as run:
            run.begin("sample", "")
            assert not _lock_free(run.dir)  # held for the whole block
            run.begin("score", "")
            raise RuntimeError("in the score stage")
    # the stages that began are timed, the failed one included; the lock is free again
    assert list(json.loads((run.dir / "timings.json").read_text())["seconds"]) == ["sample", "score"]
    assert _lock_free(run.dir)
    _, began = _recipe(cfg, stop="sample")
    assert began == [("sample", False)] and _lock_free(run.dir)
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        with Run(cfg, STAGES, log=lambda *a: None) as run:
            run.begin("nope", "")
