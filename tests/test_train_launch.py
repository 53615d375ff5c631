"""`train_preferences` under a distributed launch: `torchrun --nproc_per_node 2` on the CPU (gloo).

- Both ranks finish every run, and rank 1 writes nothing in the output folders outside the
  Trainer's own checkpoints (an audit hook records every write, rename and delete there: the
  race on `train/model` is checked deterministically, not by luck). Rank 0's record shows the
  hook does see the writes it makes.
- Same seed, same data: DDP with per-device batch b on 2 ranks logs the same loss curve (and
  reward margins) as one process with batch 2b, and saves the same adapter, which loads.
  Once with the default settings, once with gradient accumulation and `cache_frozen_blocks`
  (frozen blocks' output recorded, trained from through the DDP wrapper).
- A second call into the finished folder loads the run on both ranks and trains nothing; a
  third with `resume=False` clears it (rank 0 alone) and trains the same weights again.
- The shared-prompt layout is off under the launch with one warning (rank 0's).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from dualign.train import PreferenceConfig, load_trained, train_preferences

N_PAIRS = 8
# (name, per-device batch under the launch, gradient accumulation, extra settings): 2 ranks,
# global batch 4 pairs either way, so 2 optimizer steps per epoch, 4 in all
RUNS = [("plain", 2, 1, {}),
        ("frozen", 1, 2, {"lora_last_layers": 1, "cache_frozen_blocks": True})]
COMMON = dict(num_train_epochs=2, learning_rate=5e-3, logging_steps=1, save_steps=2, report_to="none",
              lora_r=4, lora_alpha=8, ref_batch_size=4)
SHARE_WARNING = "share_prompt is verified in one process only"

# Each rank: train every run of the spec, in order, on a fresh copy of the model, and record
# what it returned; an audit hook lists every write, rename and delete under the output root
# outside `checkpoint-*` folders (the Trainer writes its per-rank RNG states in there).
SCRIPT = textwrap.dedent('''
    import json, os, sys

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    root = os.path.realpath(spec["root"])
    rank = int(os.environ["RANK"])
    writes = []

    def under_root(path):
        if not isinstance(path, (str, os.PathLike)):
            return False
        p = os.path.realpath(os.fspath(path))
        return p.startswith(root + os.sep) and "checkpoint-" not in p[len(root):]

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \\
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing and under_root(path):
                writes.append(["open", os.fspath(path)])
        elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and under_root(args[0]):
            writes.append([event, os.fspath(args[0])])

    sys.addaudithook(audit)

    import hashlib
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dualign.train import PreferenceConfig, train_preferences

    pairs = pd.read_parquet(spec["pairs"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    for run in spec["runs"]:
        model = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
        res = train_preferences(model, tok, pairs, PreferenceConfig(**run["config"]), resume=run["resume"])
        trained = sorted((n, p) for n, p in res.model.named_parameters() if "lora_" in n)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in trained)).hexdigest()
        record = {"skipped": res.skipped, "global_step": res.global_step, "train_loss": res.train_loss,
                  "log_history": res.log_history, "weights": digest, "n_lora": len(trained)}
        with open(os.path.join(spec["records"], f"{run['tag']}-rank{rank}.json"), "w") as f:
            json.dump(record, f)
    with open(os.path.join(spec["records"], f"audit-rank{rank}.json"), "w") as f:
        json.dump(writes, f)
''')


pytestmark = pytest.mark.usefixtures("one_thread")  # the launched ranks run one thread too


def _pairs() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    prompts = ["hi", "what is two plus two?", "tell me a story about a dragon", "why?"]
    answers = ["yes", "no", "maybe not", "the sky is blue", "I can't help with that", "sure, here:",
               "a much longer answer that goes on and on", "ok"]
    return pd.DataFrame({"prompt": [prompts[i % 4] for i in range(N_PAIRS)],
                         "response_0": [answers[i] for i in range(N_PAIRS)],
                         "response_1": [answers[(3 * i + 1) % N_PAIRS] for i in range(N_PAIRS)],
                         "label": rng.uniform(0.05, 0.95, N_PAIRS)})


def _config(out, batch: int, accumulation: int, extra: dict) -> dict:
    return dict(COMMON, output_dir=str(out), per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation, **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if "lora_" in n}


def _curve(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h and "train_runtime" not in h]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir):
    """One 2-rank launch running, in order: each of RUNS from scratch; "plain" again into its
    finished folder ("auto": loads it); "plain" once more with resume=False (clears, retrains).
    Returns (root, records dir, completed process)."""
    root = tmp_path_factory.mktemp("launch")
    records = root / "records"
    records.mkdir()
    pairs = root / "pairs.parquet"
    _pairs().to_parquet(pairs)
    runs = [{"tag": name, "resume": False, "config": _config(root / "out" / name, b, acc, extra)}
            for name, b, acc, extra in RUNS]
    plain = runs[0]["config"]
    runs += [{"tag": "plain-again", "resume": "auto", "config": plain},
             {"tag": "plain-fresh", "resume": False, "config": plain}]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"root": str(root / "out"), "records": str(records), "pairs": str(pairs),
                                "model": str(tiny_model_dir), "runs": runs}))
    script = root / "launch.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[max(proc.stderr.find("Traceback"), 0):][:6000]
    return root, records, proc


def _record(records, tag: str, rank: int) -> dict:
    return json.loads((records / f"{tag}-rank{rank}.json").read_text())


def test_both_ranks_finish_and_only_rank_0_writes(launched):
    root, records, proc = launched
    for tag in ("plain", "frozen", "plain-again", "plain-fresh"):
        r0, r1 = _record(records, tag, 0), _record(records, tag, 1)
        assert r0["global_step"] == 4 and r0["n_lora"] > 0, tag
        # DDP keeps the replicas equal bit for bit; the summaries are rank 0's on both ranks
        assert r0 == r1, tag
    audit0 = json.loads((records / "audit-rank0.json").read_text())
    audit1 = json.loads((records / "audit-rank1.json").read_text())
    assert audit1 == []
    # the hook does see writes: rank 0's model folder (written under model.tmp, renamed), its
    # reference cache, run and result records, and the clearing of the finished run
    seen = {(e, os.path.relpath(p, root / "out")) for e, p in audit0}
    for name, *_ in RUNS:
        assert ("os.rename", f"{name}/model.tmp") in seen
        assert ("open", f"{name}/model.tmp/adapter_config.json") in seen
        for record in ("train_run.json", "ref_logps.npz", "train_result.json"):
            assert any(e == "os.rename" and p.startswith(f"{name}/.{record}.") for e, p in seen), record
    assert {("shutil.rmtree", "plain/model"), ("os.remove", "plain/train_result.json")} <= seen
    for name, *_ in RUNS:
        out = root / "out" / name
        assert (out / "model" / "adapter_model.safetensors").is_file()
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        assert {f"rng_state_{r}.pth" for r in (0, 1)} <= {p.name for p in (out / "checkpoint-4").iterdir()}
    # the finished run was loaded, not retrained; starting over trained the same weights again
    assert _record(records, "plain-again", 0)["skipped"] and not _record(records, "plain", 0)["skipped"]
    assert _record(records, "plain-fresh", 0)["weights"] == _record(records, "plain", 0)["weights"]
    # shared prompts are off under the launch, said by rank 0 once per training that ran (3; both
    # ranks would make 6)
    assert proc.stderr.count(SHARE_WARNING) == 3, proc.stderr[-3000:]
    assert "cache_frozen_blocks is verified" not in proc.stderr  # DDP keeps it on


@pytest.mark.parametrize("name,batch,accumulation,extra", RUNS, ids=[r[0] for r in RUNS])
def test_ddp_matches_one_process_with_the_same_global_batch(launched, tmp_path, tiny_model_dir,
                                                            name, batch, accumulation, extra):
    """Same pairs in every optimizer step, so the only differences are float32 rounding: the one
    process runs the shared-prompt layout on batches padded to their longest pair, each rank
    the concatenated layout on its half (other shapes, other summation order), and DDP averages
    the two halves' gradients where the one process averages over the whole batch.
    Measured: logged values differ by at most 1.3e-6 relative (grad_norm; loss 3.5e-7), 8e-7
    absolute; the adapter weights (|lora_B| up to 1.3e-2 after 4 Adam steps of lr 5e-3) by at
    most 4.7e-6, where Adam divides a near-zero gradient by its own size and so blows its
    rounding up. Tolerances: rtol 2e-5 (atol 1e-6, for margins near 0) on the logged
    curves, 2e-5 absolute on the weights (0.4% of one Adam step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, records, _ = launched
    ddp = _record(records, name, 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    one = train_preferences(base, tokenizer, _pairs(),
                            PreferenceConfig(**_config(tmp_path / name, 2 * batch, accumulation, extra)),
                            resume=False)
    for key in ("loss", "rewards/margins", "rewards/target_gap", "grad_norm"):
        a, b = np.array(_curve(ddp["log_history"], key)), np.array(_curve(one.log_history, key))
        assert len(a) == len(b) == 4, key
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=key)
    losses = _curve(one.log_history, "loss")
    assert max(losses) - min(losses) > 1e-3  # the curve moves: equal curves say something
    # the adapter the launch saved loads, and holds the one-process weights
    trained, _ = load_trained(root / "out" / name / "model",
                              base_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    saved, expected = _lora(trained), _lora(one.model)
    assert saved.keys() == expected.keys() and saved
    assert max(float(np.abs(v).max()) for k, v in saved.items() if "lora_B" in k) > 0  # B starts at 0
    for k in expected:
        np.testing.assert_allclose(saved[k], expected[k], rtol=0, atol=2e-5, err_msg=k)
    digest = hashlib.sha256(b"".join(v.tobytes() for _, v in sorted(saved.items()))).hexdigest()
    assert digest == ddp["weights"]  # what was saved is what rank 0 returned
