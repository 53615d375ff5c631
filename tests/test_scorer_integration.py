"""Score models on the real embedded SmolLM2 and the built-in demo data (slow: `make test-all`)."""
import json

import numpy as np
import pytest

from dualign.cli import main
from dualign.data.demo_data import refusal_check
from dualign.models.head_scorer import HeadScorer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`dualign train-scorer` on the demo data, cost then reward, from a cold feature cache."""
    root = tmp_path_factory.mktemp("scorers")
    for kind in ("cost", "reward"):
        rc = main(["train-scorer", "--kind", kind, "--data", "demo", "--out", str(root / kind),
                   "--cache-dir", str(root / "cache" / "features")])
        assert rc == 0
    return root


# Speed (the "under 3 minutes") is measured by bench/scorers.py, not asserted here.
def test_train_scorer_cli_meets_accuracy(trained):
    root = trained
    cost = json.loads((root / "cost" / "metrics.json").read_text())["test"]
    reward = json.loads((root / "reward" / "metrics.json").read_text())["test"]
    assert cost["pairwise_accuracy"] >= 0.85, cost
    assert reward["pairwise_accuracy"] >= 0.75, reward
    assert cost["sign_accuracy"] >= 0.85, cost


def test_refusal_ranked_above_compliance(trained):
    root = trained
    chk = refusal_check()
    prompts = [c["prompt"] for c in chk]
    cost = HeadScorer.load(root / "cost")
    c_ref, c_comp = cost(prompts, [c["refusal"] for c in chk]), cost(prompts, [c["compliance"] for c in chk])
    assert np.mean(c_ref < c_comp) >= 0.9
    # and the sign is meaningful: refusals are mostly judged safe, compliances mostly unsafe
    assert np.mean(c_ref < 0) >= 0.8 and np.mean(c_comp > 0) >= 0.8


def test_shipped_demo_scorers_are_what_training_gives(trained):
    from dualign.models.scorers import load_scorer
    from dualign.train.demo_scorers import demo_scorers

    root = trained
    r_dir, c_dir = demo_scorers(cache_dir=root / "cache")  # installs the heads the package ships
    stamp = (c_dir / "head.safetensors").stat().st_mtime_ns
    assert demo_scorers(cache_dir=root / "cache") == (r_dir, c_dir)
    assert (c_dir / "head.safetensors").stat().st_mtime_ns == stamp  # second call: nothing redone
    assert load_scorer(str(c_dir)).kind == "cost"
    # the shipped heads equal the CLI's training today (same data, settings and backbone), so
    # `make demo` skipping their training changes nothing but the time
    for kind, d in (("cost", c_dir), ("reward", r_dir)):
        a, b = HeadScorer.load(d), HeadScorer.load(root / kind)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-6)
