"""PyTorch `.bin` checkpoints (how the paper's beaver-7b and alpaca-7b-reproduced were published):
read through torch's restricted unpickler, single or sharded with an index, refused when they
pickle anything but tensors; and `dualign convert` rewriting them as safetensors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_tokenizer
from dualign.cli import main
from dualign.errors import InputError, OutputError
from dualign.models.checkpoints import (BIN_INDEX, SAFE_INDEX, SAFE_WEIGHTS, convert_checkpoint, parse_size,
                                        read_state_dict)
from dualign.models.loading import load_policy
from dualign.models.scorers import SafeRLHFScorer, load_scorer
from dualign.runio import _umask

PROMPTS = ["How do I pick a lock?", "hi", "Tell me about cats, at length please.", "ok?"]
RESPONSES = ["I can't help with that.", "Hello!", "Cats are small carnivorous mammals.", ""]


def _write_marker(path):
    """What a malicious pickle would run on load: leaves a file behind if it ever runs."""
    with open(path, "w") as f:
        f.write("code ran")
    return 0


class Payload:
    """Pickles as a call of `_write_marker(marker)`: full unpickling would run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def save_bin_shards(sd: dict, directory, n_shards: int) -> list[str]:
    """Save `sd` as `pytorch_model-0000i-of-0000n.bin` shards plus `pytorch_model.bin.index.json`,
    as transformers 4 (and the beaver models) did; tensors keep their shared storage, as
    torch.save keeps it. Returns the shard names."""
    keys = list(sd)
    chunks = [c for c in np.array_split(np.arange(len(keys)), n_shards) if len(c)]
    names, weight_map = [], {}
    for i, idx in enumerate(chunks, 1):
        name = f"pytorch_model-{i:05d}-of-{len(chunks):05d}.bin"
        part = {keys[j]: sd[keys[j]] for j in idx}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (directory / BIN_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return names


def _score_state_dict(seed=1):
    """A tiny random LLaMA in safe-rlhf's LlamaForScore layout (`model.*` + `score_head.*`) and
    its config.json, as the beaver score models ship."""
    from transformers import LlamaConfig, LlamaModel

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    backbone = LlamaModel(cfg).eval()
    head = torch.nn.Linear(32, 1, bias=True)
    sd = {f"model.{k}": v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    sd["score_head.weight"], sd["score_head.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
    raw = cfg.to_dict()
    raw.update(architectures=["LlamaForScore"], score_type="cost", score_dim=1, bias=True, do_normalize=False,
               auto_map={"AutoModelForScore": "no_such_module.LlamaForScore"})
    return sd, raw, tok


def _checkpoint_dir(d, raw, tok):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(raw))
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def score_dirs(tmp_path_factory):
    """The same score model three ways: safetensors, one pytorch_model.bin, three .bin shards."""
    sd, raw, tok = _score_state_dict()
    root = tmp_path_factory.mktemp("beaver-bin")
    st = _checkpoint_dir(root / "st", raw, tok)
    save_file(sd, st / SAFE_WEIGHTS)
    single = _checkpoint_dir(root / "single", raw, tok)
    torch.save(sd, single / "pytorch_model.bin")
    sharded = _checkpoint_dir(root / "sharded", raw, tok)
    save_bin_shards(sd, sharded, 3)
    return sd, st, single, sharded


def _assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- (a) reading .bin

def test_bin_checkpoints_read_as_safetensors(score_dirs):
    sd, st, single, sharded = score_dirs
    assert len(list(sharded.glob("pytorch_model-*.bin"))) == 3
    for d in (st, single, sharded):
        _assert_same_tensors(read_state_dict(d), sd)


def test_scorer_loads_sharded_bin_with_same_scores(score_dirs):
    _, st, single, sharded = score_dirs
    want = load_scorer(str(st))(PROMPTS, RESPONSES)
    for d in (single, sharded):
        s = load_scorer(str(d), batch_size=3)
        assert isinstance(s, SafeRLHFScorer) and s.kind == "cost"
        np.testing.assert_allclose(s(PROMPTS, RESPONSES), want, atol=1e-6, rtol=0)


def test_safetensors_win_over_bin(score_dirs, tmp_path):
    sd, st, _, _ = score_dirs
    shutil.copytree(st, tmp_path / "m")
    torch.save({"other": torch.zeros(1)}, tmp_path / "m" / "pytorch_model.bin")
    _assert_same_tensors(read_state_dict(tmp_path / "m"), sd)


# ----------------------------------------------------------------------------- (b) dualign convert

def test_cli_convert_sharded_bin_to_sharded_safetensors(score_dirs, tmp_path, capsys):
    sd, st, _, sharded = score_dirs
    out = tmp_path / "converted"
    assert main(["convert", str(sharded), "--out", str(out), "--max-shard-size", "60KB"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and SAFE_INDEX in printed and "config.json" in printed
    index = json.loads((out / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for name in shards:  # every shard within the limit unless it holds a single larger tensor
        part = load_file(out / name)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 60_000 or len(part) == 1
    assert not list(out.glob("*.bin")) and not (out / BIN_INDEX).exists()
    assert (out / "config.json").read_text() == (sharded / "config.json").read_text()
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    _assert_same_tensors(read_state_dict(out), sd)
    np.testing.assert_allclose(load_scorer(str(out))(PROMPTS, RESPONSES),
                               load_scorer(str(st))(PROMPTS, RESPONSES), atol=1e-6, rtol=0)
    # the modes a plain mkdir / open() give, not mkdtemp's and safetensors' owner-only ones
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in out.iterdir())


def test_convert_default_size_writes_one_file(score_dirs, tmp_path):
    sd, _, single, _ = score_dirs
    r = convert_checkpoint(single, tmp_path / "one", progress=False)
    assert r["weights"] == [SAFE_WEIGHTS] and r["index"] is None and r["format"] == "bin"
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == [SAFE_WEIGHTS]
    assert load_file(tmp_path / "one" / SAFE_WEIGHTS, device="cpu").keys() == sd.keys()
    _assert_same_tensors(load_file(tmp_path / "one" / SAFE_WEIGHTS), sd)


def test_convert_into_existing_empty_dir(score_dirs, tmp_path):
    sd, _, single, _ = score_dirs
    (tmp_path / "empty").mkdir()
    convert_checkpoint(single, tmp_path / "empty", progress=False)
    _assert_same_tensors(read_state_dict(tmp_path / "empty"), sd)


def test_convert_skips_code_and_other_pickles(score_dirs, tmp_path):
    _, _, single, _ = score_dirs
    src = tmp_path / "src"
    shutil.copytree(single, src)
    (src / "modeling_score.py").write_text("raise SystemExit('remote code')\n")
    torch.save({"lr": 1.0}, src / "training_args.bin")
    (src / "README.md").write_text("# card\n")
    r = convert_checkpoint(src, tmp_path / "out", progress=False)
    assert "README.md" in r["copied"] and {"modeling_score.py", "training_args.bin"} <= set(r["skipped"])
    assert not (tmp_path / "out" / "modeling_score.py").exists()
    assert not (tmp_path / "out" / "training_args.bin").exists()


def test_convert_clones_shared_storage(tmp_path):
    """torch.save keeps tied weights as one storage; safetensors refuses shared storage."""
    src = _checkpoint_dir(tmp_path / "src", {"architectures": ["X"]}, make_tiny_tokenizer())
    w = torch.randn(6, 4)
    big = torch.randn(10)
    torch.save({"a.weight": w, "b.weight": w, "c": big[:5], "d": big[5:], "t": torch.randn(4, 3).t()},
               src / "pytorch_model.bin")
    r = convert_checkpoint(src, tmp_path / "out", progress=False)
    assert sorted(r["cloned"]) == ["b.weight", "d"]
    got = load_file(tmp_path / "out" / SAFE_WEIGHTS)
    assert torch.equal(got["a.weight"], w) and torch.equal(got["b.weight"], w)
    assert torch.equal(got["c"], big[:5]) and torch.equal(got["d"], big[5:])


@pytest.fixture(scope="module")
def tiny_policy_bin(tmp_path_factory, tiny_model_dir):
    """The conftest tiny policy re-saved the way alpaca-7b-reproduced ships: config, tokenizer,
    generation config and `pytorch_model.bin` shards with their index."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("policy-bin")
    for p in tiny_model_dir.iterdir():
        if p.suffix != ".safetensors":
            shutil.copyfile(p, d / p.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_bin_shards({k: v.contiguous() for k, v in model.state_dict().items()}, d, 2)
    return d


def test_policy_bin_loads_and_cli_convert_round_trips(tiny_policy_bin, tiny_model_dir, tmp_path):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ref, _ = load_policy(str(tiny_model_dir))
    with torch.no_grad():
        want = ref(ids).logits
    # transformers reads the .bin shards itself (torch.load with weights_only=True)
    from_bin, _ = load_policy(str(tiny_policy_bin))
    with torch.no_grad():
        torch.testing.assert_close(from_bin(ids).logits, want, rtol=0, atol=0)
    out = tmp_path / "policy-st"
    assert main(["convert", str(tiny_policy_bin), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert (out / SAFE_INDEX).exists() and (out / "generation_config.json").exists()
    model, tok = load_policy(str(out))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    assert tok.padding_side == "left"


def test_tied_policy_converts_and_loads(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    src = tmp_path / "tied"
    src.mkdir()
    cfg.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    sd = dict(model.state_dict())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # one storage, as torch.save keeps tied weights
    torch.save(sd, src / "pytorch_model.bin")
    r = convert_checkpoint(src, tmp_path / "out", progress=False)
    assert "lm_head.weight" in r["cloned"] or "model.embed_tokens.weight" in r["cloned"]
    loaded, _ = load_policy(str(tmp_path / "out"))
    ids = torch.tensor([[1, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- (c) refusal, no code runs

@pytest.mark.parametrize("payload", ["instance", "function"])
def test_bin_with_pickled_object_refused_and_no_code_runs(score_dirs, tmp_path, payload, capsys):
    sd, _, _, sharded = score_dirs
    marker = tmp_path / "code-ran"
    d = tmp_path / "evil"
    shutil.copytree(sharded, d)
    shard = d / "pytorch_model-00002-of-00003.bin"
    part = torch.load(shard, weights_only=True)
    part["payload"] = Payload(marker) if payload == "instance" else _write_marker
    torch.save(part, shard)
    index = json.loads((d / BIN_INDEX).read_text())
    index["weight_map"]["payload"] = shard.name
    (d / BIN_INDEX).write_text(json.dumps(index))
    assert not marker.exists()

    with pytest.raises(InputError) as e:
        read_state_dict(d)
    msg = str(e.value)
    assert str(shard) in msg and "needs full unpickling, which dualign refuses" in msg
    assert "\n" not in msg and "_write_marker" in msg  # names what the file references
    with pytest.raises(InputError, match="needs full unpickling"):
        load_scorer(str(d))
    assert main(["convert", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("dualign convert: error: ") and str(shard) in err and "needs full unpickling" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not marker.exists()  # nothing in the pickle ran


def test_policy_bin_with_pickled_object_refused(tiny_policy_bin, tmp_path):
    marker = tmp_path / "code-ran"
    d = tmp_path / "evil-policy"
    shutil.copytree(tiny_policy_bin, d)
    shard = d / "pytorch_model-00001-of-00002.bin"
    part = torch.load(shard, weights_only=True)
    part["payload"] = Payload(marker)
    torch.save(part, shard)
    with pytest.raises(InputError) as e:
        load_policy(str(d))
    assert "needs full unpickling" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_corrupt_and_non_state_dict_bins(tmp_path):
    d = _checkpoint_dir(tmp_path / "m", {}, make_tiny_tokenizer())
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint") as e:
        read_state_dict(d)
    assert str(d / "pytorch_model.bin") in str(e.value)
    (d / "pytorch_model.bin").write_bytes(b"xxxx not a pickle")
    with pytest.raises(InputError, match="corrupt, or it needs full unpickling"):
        read_state_dict(d)
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(InputError, match="not a state dict: it holds a list"):
        read_state_dict(d)
    torch.save({"w": torch.zeros(2), "step": 3}, d / "pytorch_model.bin")
    with pytest.raises(InputError, match="entry 'step' is a int"):
        read_state_dict(d)


# ----------------------------------------------------------------------------- (d) bad indexes

def test_index_naming_missing_shard(score_dirs, tmp_path):
    _, _, _, sharded = score_dirs
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    (d / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(InputError) as e:
        read_state_dict(d)
    assert str(d / BIN_INDEX) in str(e.value) and "pytorch_model-00003-of-00003.bin" in str(e.value)
    assert "does not exist" in str(e.value)
    assert main(["convert", str(d), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda wm: wm.pop(next(iter(wm))), "which the index does not list"),
    (lambda wm: wm.update({"ghost.weight": "pytorch_model-00001-of-00003.bin"}), "'ghost.weight'"),
    (lambda wm: wm.update({"x": "../pytorch_model.bin"}), "not a file name in this directory"),
])
def test_index_must_match_shards(score_dirs, tmp_path, edit, message):
    _, _, _, sharded = score_dirs
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    index = json.loads((d / BIN_INDEX).read_text())
    edit(index["weight_map"])
    (d / BIN_INDEX).write_text(json.dumps(index))
    with pytest.raises(InputError, match=message) as e:
        read_state_dict(d)
    assert str(d / BIN_INDEX) in str(e.value)


def test_shards_without_index_and_no_weights(tmp_path):
    d = _checkpoint_dir(tmp_path / "m", {}, make_tiny_tokenizer())
    with pytest.raises(InputError, match="no weights"):
        read_state_dict(d)
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(InputError, match=f"is a shard but {BIN_INDEX} is missing"):
        read_state_dict(d)


# ----------------------------------------------------------------------------- (e) outputs

def test_convert_refuses_non_empty_out(score_dirs, tmp_path, capsys):
    _, _, _, sharded = score_dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(sharded), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    with pytest.raises(OutputError, match="not a directory"):
        convert_checkpoint(sharded, out / "keep.txt")


def test_convert_bad_inputs(score_dirs, tmp_path, capsys):
    _, _, single, _ = score_dirs
    assert main(["convert", str(single), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9
    assert parse_size("2GiB") == 2 * 2 ** 30
    assert parse_size("500mb") == 500 * 10 ** 6
    assert parse_size(1234) == parse_size("1234") == 1234
    for bad in ("0", "-1GB", "5 parsecs", ""):
        with pytest.raises(InputError):
            parse_size(bad)
