"""Sampling: reproducible by seed (whatever the batch size), a correct sampler, resumable
after a kill, and the documented one-line errors for bad prompt files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dualign.cli import main
from dualign.errors import InputError
from dualign.models import generation
from dualign.models.generation import (PARTIAL_DIR, SAMPLES_FILE, generate_batch, plan_batches,
                                       read_prompts, sample)
from dualign.models.loading import load_policy
from dualign.models.text import encode_prompt

PROMPTS = ["hi", "hello there", "a longer prompt here, much longer", "x", "what now?"]
KW = dict(num_samples=3, max_new_tokens=10, temperature=1.0, top_p=0.9, progress=False)


def test_same_seed_same_samples_any_batch_size(tiny_model, tiny_tokenizer):
    a = sample(tiny_model, tiny_tokenizer, PROMPTS, seed=7, batch_size=4, **KW)
    b = sample(tiny_model, tiny_tokenizer, PROMPTS, seed=7, batch_size=4, **KW)
    c = sample(tiny_model, tiny_tokenizer, PROMPTS, seed=7, batch_size=6, **KW)
    d = sample(tiny_model, tiny_tokenizer, PROMPTS, seed=8, batch_size=4, **KW)
    pd.testing.assert_frame_equal(a, b)
    # each row has its own random stream: the batch it lands in does not matter
    assert a["response"].tolist() == c["response"].tolist()
    assert (a["response"] != d["response"]).mean() > 0.5
    assert len(a) == len(PROMPTS) * 3
    assert a[["prompt_id", "sample_id"]].values.tolist() == [[p, k] for p in range(5) for k in range(3)]
    assert a["prompt"].tolist() == [p for p in PROMPTS for _ in range(3)]
    assert a["response"].nunique() > 10  # samples differ across k
    assert set(a.columns) >= {"prompt_id", "prompt", "sample_id", "response", "n_tokens", "seed", "model"}


def test_a_prompt_runs_once_for_all_its_samples(tiny_model, tiny_tokenizer):
    """The prompts' common prefix (the chat template's opening) runs once for one row, each
    prompt's own tokens once for its K rows (the cache is copied to each row), and the rows
    give the samples each gives alone (batch size 1: no sharing at all)."""
    shapes = []
    hook = tiny_model.register_forward_pre_hook(
        lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    try:
        shared = sample(tiny_model, tiny_tokenizer, PROMPTS[:2], seed=5, batch_size=6, **KW)
    finally:
        hook.remove()
    enc = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS[:2]]
    S = generation.shared_prefix_length(enc)
    assert S > 0 and enc[0][:S] == enc[1][:S]
    # the prefix for one row; the rest of the 2 prompts, left-padded; then 6 rows, a token each
    assert shapes[:3] == [(1, S), (2, max(map(len, enc)) - S), (6, 1)]
    alone = sample(tiny_model, tiny_tokenizer, PROMPTS[:2], seed=5, batch_size=1, **KW)
    assert shared["response"].tolist() == alone["response"].tolist()


def test_shared_prefix_length():
    f = generation.shared_prefix_length
    assert f([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert f([[1, 2], [1, 2]]) == 1  # every prompt keeps a token of its own
    assert f([[7, 1], [8, 1]]) == 0
    assert f([[1, 2, 3]]) == 0  # nothing to share with one prompt
    assert f([[1], [1, 2]]) == 0


def test_shared_prefix_gives_the_unshared_tokens(tiny_model, tiny_tokenizer):
    """The common prefix run once and copied, the rest left-padded after it: the same tokens,
    greedy and sampled, with either cache, as every prompt run whole and left-padded."""
    enc = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS for _ in range(2)]
    assert generation.shared_prefix_length(enc) > 3
    u = np.random.default_rng(1).random((len(enc), 12))
    for cache in ("buffer", "dynamic"):
        for kw in (dict(temperature=1.0, top_p=0.9, uniforms=u), dict(temperature=0)):
            shared, whole = (generate_batch(tiny_model, tiny_tokenizer, enc, max_new_tokens=12, cache=cache,
                                            share_prefix=share, **kw) for share in (True, False))
            assert shared == whole


def test_sampler_is_inverse_cdf_of_the_nucleus(tiny_model, tiny_tokenizer):
    """Each row's first token is the inverse CDF of the top-p distribution (computed by hand
    in float64) at that row's uniform; nothing outside the nucleus is ever drawn."""
    n, temp, top_p = 2000, 0.7, 0.5
    ids = encode_prompt(tiny_tokenizer, "hi")
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].double() / temp
    sp, si = torch.sort(torch.softmax(logits, -1), descending=True)
    keep = (sp.cumsum(0) - sp) <= top_p
    nucleus, cdf = si[keep].numpy(), (sp[keep].cumsum(0) / sp[keep].sum()).numpy()
    u = np.random.default_rng(0).random((n, 1))
    expected = nucleus[np.minimum(np.searchsorted(cdf, u[:, 0], side="right"), len(cdf) - 1)]
    res = generate_batch(tiny_model, tiny_tokenizer, [ids] * n, max_new_tokens=1,
                         temperature=temp, top_p=top_p, uniforms=u)
    got = np.array([t[0] for t, _ in res])
    assert set(got) <= set(nucleus.tolist()) and len(set(got)) > 5
    assert (got != expected).mean() < 0.005  # float32 vs float64 CDF: rare boundary flips only


def test_greedy_batched_equals_one_at_a_time(tiny_model, tiny_tokenizer):
    enc = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS]
    batched = generate_batch(tiny_model, tiny_tokenizer, enc, max_new_tokens=8, temperature=0)
    for e, (toks, _) in zip(enc, batched):
        ref = tiny_model.generate(torch.tensor([e]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)[0, len(e):].tolist()
        assert toks == ref[:len(toks)]


def test_resume_after_kill_gives_identical_file(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    full = tmp_path / "full"
    sample(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=2, out_dir=full, model_name="tiny", **KW)

    real, calls = generation.generate_batch, {"n": 0}

    def dies_after_two(*a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        calls["n"] += 1
        return real(*a, **k)

    run = tmp_path / "killed"
    monkeypatch.setattr(generation, "generate_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=2, out_dir=run, model_name="tiny", **KW)
    assert not (run / SAMPLES_FILE).exists()
    assert len(list((run / PARTIAL_DIR).glob("batch-*.parquet"))) == 2

    calls["n"], seen = -100, []  # no more kills; count what the resumed run generates
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: seen.append(1) or real(*a, **k))
    sample(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=2, out_dir=run, model_name="tiny", **KW)
    n_batches = len(plan_batches([1] * len(PROMPTS), 3, 2))
    assert len(seen) == n_batches - 2  # the two finished batches were not redone
    assert (run / SAMPLES_FILE).read_bytes() == (full / SAMPLES_FILE).read_bytes()
    assert not (run / PARTIAL_DIR).exists()
    # finished: a rerun with the same settings reads the file and generates nothing
    seen.clear()
    sample(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=2, out_dir=run, model_name="tiny", **KW)
    assert seen == []


def test_partial_parts_from_other_settings_are_discarded(tiny_model, tiny_tokenizer, tmp_path):
    part = tmp_path / PARTIAL_DIR
    part.mkdir()
    (part / "settings.json").write_text(json.dumps({"seed": 999}))
    pd.DataFrame({"prompt_id": [0]}).to_parquet(part / "batch-000000.parquet")
    df = sample(tiny_model, tiny_tokenizer, PROMPTS[:2], seed=1, batch_size=2, out_dir=tmp_path, **KW)
    ref = sample(tiny_model, tiny_tokenizer, PROMPTS[:2], seed=1, batch_size=2, **KW)
    pd.testing.assert_frame_equal(df, ref)


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"q": "a"}\n{"q": "b"}\n')
    assert read_prompts(tmp_path / "p.jsonl", column="q") == ["a", "b"]
    pd.DataFrame({"prompt": ["c", "d", "e"]}).to_csv(tmp_path / "p.csv", index=False)
    assert read_prompts(tmp_path / "p.csv", limit=2) == ["c", "d"]
    pd.DataFrame({"prompt": ["f"]}).to_parquet(tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["f"]


@pytest.mark.parametrize("name,content,column,message", [
    ("empty.txt", "\n\n", "prompt", "empty.txt: no prompts"),
    ("empty.jsonl", "", "prompt", "empty.jsonl: the table is empty"),
    ("p.jsonl", '{"text": "a"}\n', "prompt", "p.jsonl, field 'prompt': missing column"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', "prompt",
     "bad.jsonl, record 2, field 'prompt': expected a non-empty string"),
])
def test_bad_prompt_files_one_line_errors(tmp_path, name, content, column, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError) as e:
        read_prompts(tmp_path / name, column=column)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_sample(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\nworld\n")
    argv = ["sample", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "p.txt"),
            "--num-samples", "2", "--max-new-tokens", "5", "--seed", "4", "--out", str(tmp_path / "run"),
            "--no-progress"]
    assert main(argv) == 0
    df = pd.read_parquet(tmp_path / "run" / SAMPLES_FILE)
    assert len(df) == 4 and (df["model"] == str(tiny_model_dir)).all() and (df["seed"] == 4).all()
    # log-probs of the samples: EOS counted only where the sample emitted it
    assert main(["logprobs", "--model", str(tiny_model_dir), "--samples", str(tmp_path / "run" / SAMPLES_FILE),
                 "--name", "ref", "--no-progress"]) == 0
    from dualign.models.logprobs import logprobs
    model, tok = load_policy(str(tiny_model_dir))
    want, _ = logprobs(model, tok, df["prompt"].tolist(), df["response"].tolist(),
                       append_eos=~df["truncated"].to_numpy())
    got = pd.read_parquet(tmp_path / "run" / "scores.parquet")["logp/ref"].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("")
    argv[4] = str(tmp_path / "empty.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no prompts" in err


def test_sample_tokens_candidate_sets_agree_with_full_sort(monkeypatch):
    """The top-256 shortcut (and its widening for flat rows) picks exactly what a full sort picks."""
    from dualign.models.generation import sample_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(48, 5000, generator=g) * torch.linspace(0.5, 12, 48)[:, None]
    u = torch.rand(48, generator=g, dtype=torch.float64)
    fast = sample_tokens(logits, u, 0.8, 0.9)
    monkeypatch.setattr(generation, "_TOPK_FIRST", 5000)
    full = sample_tokens(logits, u, 0.8, 0.9)
    assert torch.equal(fast, full)
    # top-k: never outside the k likeliest
    k = sample_tokens(logits, u, 1.0, 1.0, top_k=5)
    assert all(t in set(logits[i].topk(5).indices.tolist()) for i, t in enumerate(k[:, 0].tolist()))


def test_inverse_cdf_never_picks_a_zero_mass_token():
    from dualign.models.generation import _inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 1.0 - 1e-12], dtype=torch.float64)
    assert _inverse_cdf(probs, u)[:, 0].tolist() == [1, 1, 3, 3]
    assert _inverse_cdf(probs, torch.ones(4, dtype=torch.float64))[:, 0].tolist() == [3] * 4  # rounding edge


# ----------------------------------------------------------------------------- the preallocated KV cache

def _with_stops(model, stops):
    """A copy of `model` that also stops at `stops` (so rows finish at different steps)."""
    import copy

    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [int(m.config.eos_token_id)] + [int(s) for s in stops]
    return m


def test_buffer_cache_gives_the_dynamic_cache_tokens(tiny_model, tiny_tokenizer):
    """The preallocated cache (and mask) and transformers' DynamicCache decode the same tokens,
    sampled and greedy, with prompts of several lengths sharing a prefill, and rows leaving
    the batch at different steps (20 frequent tokens made stop tokens)."""
    enc = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS for _ in range(3)]
    u = np.random.default_rng(0).random((len(enc), 12))
    first = generate_batch(tiny_model, tiny_tokenizer, enc, max_new_tokens=12, temperature=1.0, uniforms=u)
    common = pd.Series([t for toks, _ in first for t in toks]).value_counts().index[:20].tolist()
    model = _with_stops(tiny_model, common)
    for kw in (dict(temperature=1.0, top_p=0.9, uniforms=u), dict(temperature=0.7, top_k=20, uniforms=u),
               dict(temperature=0)):
        buf = generate_batch(model, tiny_tokenizer, enc, max_new_tokens=12, cache="buffer", **kw)
        dyn = generate_batch(model, tiny_tokenizer, enc, max_new_tokens=12, cache="dynamic", **kw)
        assert buf == dyn
        if kw["temperature"] == 1.0:
            lengths = [len(t) for t, _ in buf]
            assert len(set(lengths)) >= 4 and max(lengths) == 12  # rows left at several steps, some ran on
    with pytest.raises(ValueError, match="cache"):
        generate_batch(model, tiny_tokenizer, enc[:1], max_new_tokens=2, temperature=0, cache="static")


def test_buffer_cache_forward_equals_dynamic_cache_step_by_step(tiny_model):
    """Logits, keys and values after a left-padded prefill and decoding steps with a row
    dropped: the same numbers with either cache; attention sees only the filled positions."""
    from transformers import DynamicCache

    from dualign.models.kvcache import BufferCache
    from dualign.models.loading import cache_kwarg

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, tiny_model.config.vocab_size, (3, 6), generator=g)
    att = torch.ones((3, 6), dtype=torch.long)
    att[0, :2] = 0  # left padding
    caches = {"buffer": BufferCache(6 + 4), "dynamic": DynamicCache()}
    logits = {}
    with torch.no_grad():
        for name, c in caches.items():
            a = att.clone()
            kv = {cache_kwarg(tiny_model): c}
            out = tiny_model(input_ids=ids, attention_mask=a, position_ids=(a.cumsum(-1) - 1).clamp(min=0),
                             use_cache=True, **kv)
            steps = [out.logits[:, -1]]
            nxt, rows = steps[0].argmax(-1, keepdim=True), torch.arange(3)
            for s in range(3):
                if s == 1:  # row 1 leaves the batch
                    rows = torch.tensor([0, 2])
                    c.batch_select_indices(rows)
                    nxt, a = nxt[[0, 2]], a[[0, 2]]
                a = torch.cat([a, a.new_ones((len(a), 1))], -1)
                out = tiny_model(input_ids=nxt, attention_mask=a, position_ids=a.sum(-1, keepdim=True) - 1,
                                 use_cache=True, **kv)
                steps.append(out.logits[:, -1])
                nxt = steps[-1].argmax(-1, keepdim=True)
            logits[name] = steps
    for b, d in zip(logits["buffer"], logits["dynamic"]):
        assert torch.equal(b, d)
    buf, dyn = caches["buffer"].layers[0], caches["dynamic"].layers[0]
    assert buf.get_seq_length() == dyn.get_seq_length() == 9 and buf.keys.shape == dyn.keys.shape
    assert torch.equal(buf.keys, dyn.keys) and torch.equal(buf.values, dyn.values)
    assert buf.capacity == 10 and buf._k.shape[2] == 10  # one buffer, written in place


def test_buffer_layer_in_place_writes_crop_and_overflow():
    from dualign.models.kvcache import BufferCache, BufferLayer

    layer = BufferLayer(5)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    layer.update(k, v)
    buffer = layer._k.data_ptr()
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, values = layer.update(k2, v2)
    assert layer._k.data_ptr() == buffer  # no reallocation while it fits
    assert torch.equal(keys, torch.cat([k, k2], 2)) and torch.equal(values, torch.cat([v, v2], 2))
    layer.crop(-1)
    assert layer.get_seq_length() == 2 and torch.equal(layer.keys, k)
    with pytest.raises(ValueError, match="negative"):
        layer.crop(1)
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, k[1:]) and torch.equal(layer.values, v[1:])
    layer.update(torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4))  # fills it: 5 of 5
    with pytest.raises(ValueError, match="capacity 5"):
        layer.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    with pytest.raises(ValueError, match="capacity"):
        BufferCache(0)


def test_finished_rows_riding_along_change_no_tokens(tiny_model, tiny_tokenizer):
    """Finished rows leave the batch at once, never, or at the default 1/8: the same tokens and
    stop flags, and a finished row gets no token after its stop token."""
    enc = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS for _ in range(3)]
    u = np.random.default_rng(2).random((len(enc), 12))
    first = generate_batch(tiny_model, tiny_tokenizer, enc, max_new_tokens=12, temperature=1.0, uniforms=u)
    common = pd.Series([t for toks, _ in first for t in toks]).value_counts().index[:20].tolist()
    model = _with_stops(tiny_model, common)
    runs = {at: generate_batch(model, tiny_tokenizer, enc, max_new_tokens=12, temperature=1.0, top_p=0.9,
                               uniforms=u, **({} if at is None else {"compact_at": at}))
            for at in (10 ** 9, 1, None)}  # at once; never (only when all are done); the default
    assert runs[10 ** 9] == runs[1] == runs[None]
    lengths = [len(t) for t, _ in runs[1]]
    assert len(set(lengths)) >= 4 and max(lengths) == 12
    for toks, ran_out in runs[1]:
        assert ran_out == (len(toks) == 12 and toks[-1] not in common)
        assert not any(t in common for t in toks[:-1])  # nothing after a stop token
    with pytest.raises(ValueError, match="compact_at"):
        generate_batch(model, tiny_tokenizer, enc[:1], max_new_tokens=2, temperature=0, compact_at=0)
