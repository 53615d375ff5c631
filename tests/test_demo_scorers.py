"""The demo's reward and cost heads ship with the package: `demo_scorers` installs them into an
empty cache without training (no model is loaded), and trains instead when they do not match
the demo data, a shipped file was altered, or `retrain` asks for it."""
import json
import shutil

import numpy as np
import pytest

import dualign.train.demo_scorers as scorer_mod
from dualign.data.demo_data import demo_dir
from dualign.models.head_scorer import CONFIG_FILE, WEIGHTS_FILE, HeadScorer
from dualign.train.demo_scorers import SHIPPED_DEMO_SCORERS, demo_scorers, demo_scorers_key


class TrainingCalled(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Training the heads would load the embedded model: make it an error the test can see."""
    def refuse(*args, **kwargs):
        raise TrainingCalled
    monkeypatch.setattr(scorer_mod, "train_scorer", refuse)


def test_shipped_heads_match_the_demo_data():
    # editing the demo data without `build.py --scorers` would ship heads for other data
    manifest = json.loads((demo_dir() / SHIPPED_DEMO_SCORERS).read_text())
    assert manifest["key"] == demo_scorers_key()
    assert set(manifest["files"]) == {f"{k}/{n}" for k in ("reward", "cost") for n in (CONFIG_FILE, WEIGHTS_FILE)}


def test_installs_shipped_heads_without_training(tmp_path, no_training):
    r_dir, c_dir = demo_scorers(cache_dir=tmp_path, log=lambda *a: None)
    assert r_dir.parent.name == f"demo-{demo_scorers_key()[:12]}"
    for kind, d in (("reward", r_dir), ("cost", c_dir)):
        head = HeadScorer.load(d)
        assert head.kind == kind
        assert (d / WEIGHTS_FILE).read_bytes() == (demo_dir() / f"demo_scorer_{kind}.safetensors").read_bytes()
        assert np.isfinite(head.weight).all() and head.weight.shape == (head.feature_mean.shape[0],)
    # the second call finds them cached
    assert demo_scorers(cache_dir=tmp_path, log=lambda *a: None) == (r_dir, c_dir)


def test_altered_shipped_file_trains_instead(tmp_path, monkeypatch, no_training):
    copies = tmp_path / "shipped"
    copies.mkdir()
    for f in demo_dir().glob("demo_scorer_*"):
        shutil.copy(f, copies / f.name)
    data = bytearray((copies / "demo_scorer_cost.safetensors").read_bytes())
    data[-1] ^= 1
    (copies / "demo_scorer_cost.safetensors").write_bytes(bytes(data))
    real = scorer_mod._shipped_file
    monkeypatch.setattr(scorer_mod, "_shipped_file", lambda kind, name: copies / real(kind, name).name)
    messages = []
    with pytest.raises(TrainingCalled):
        demo_scorers(cache_dir=tmp_path / "cache", log=messages.append)
    assert any("altered" in m for m in messages)
    # nothing half-installed: the reward head was not copied before the check failed
    assert not list((tmp_path / "cache").rglob(CONFIG_FILE))


def test_heads_for_other_data_train_instead(tmp_path, monkeypatch, no_training):
    monkeypatch.setattr(scorer_mod, "demo_scorers_key", lambda source=None: "0" * 64)
    messages = []
    with pytest.raises(TrainingCalled):
        demo_scorers(cache_dir=tmp_path, log=messages.append)
    assert any("other demo data" in m for m in messages)


def test_retrain_ignores_cache_and_shipped(tmp_path, no_training):
    demo_scorers(cache_dir=tmp_path, log=lambda *a: None)  # installed, cached
    with pytest.raises(TrainingCalled):
        demo_scorers(cache_dir=tmp_path, retrain=True, log=lambda *a: None)
