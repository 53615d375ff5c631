"""Preference-file loading: the three schemas, and errors that name file, record and field."""
import gzip
import json

import pandas as pd
import pytest

from dualign.data.preferences import load_preferences, split_transcript
from dualign.errors import InputError

PKU = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1,
       "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False}


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_pku_jsonl_normalized(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [PKU, {**PKU, "prompt": "q", "better_response_id": 0}])
    df = load_preferences(f, require_safety=True)
    assert df.attrs["schema"] == "pku"
    assert df["better_response_id"].tolist() == [1, 0]
    assert df["is_response_1_safe"].tolist() == [False, False]
    assert df["safer_response_id"].dtype == "int64"


@pytest.mark.parametrize("field,value,needle", [
    ("better_response_id", 2, "must be 0 or 1"),
    ("safer_response_id", "1", "must be 0 or 1"),
    ("prompt", None, "missing value"),
    ("response_1", 17, "expected a string"),
    ("is_response_0_safe", "maybe", "true or false"),
])
def test_bad_record_names_file_record_field(tmp_path, field, value, needle):
    recs = [PKU, PKU, {**PKU, field: value}]
    f = _jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(InputError) as e:
        load_preferences(f)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "record 3" in msg and f"field '{field}'" in msg and needle in msg
    assert e.value.record == 3 and e.value.field == field


def test_missing_prompt_column_and_unknown_schema(tmp_path):
    f = _jsonl(tmp_path / "x.jsonl", [{"question": "p", "answer": "a"}])
    with pytest.raises(InputError, match="unknown preference schema"):
        load_preferences(f)


def test_cost_needs_safety_labels(tmp_path):
    rec = {k: PKU[k] for k in ("prompt", "response_0", "response_1", "better_response_id")}
    f = _jsonl(tmp_path / "h.jsonl", [rec])
    assert load_preferences(f)["safer_response_id"].tolist() == [-1]
    with pytest.raises(InputError, match="safer_response_id"):
        load_preferences(f, require_safety=True)


def test_trl_csv_and_conversational_parquet(tmp_path):
    f = tmp_path / "t.csv"
    table = {"prompt": ["hi", "yo"], "chosen": ["good", "fine"], "rejected": ["bad", "meh"]}
    pd.DataFrame(table).to_csv(f, index=False)
    df = load_preferences(f)
    assert df.attrs["schema"] == "trl"
    assert df["response_0"].tolist() == ["good", "fine"] and set(df["better_response_id"]) == {0}
    g = tmp_path / "c.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "hi"}]],
                  "chosen": [[{"role": "assistant", "content": "hello"}]],
                  "rejected": [[{"role": "assistant", "content": "go away"}]]}).to_parquet(g)
    df = load_preferences(g)
    assert (df["prompt"][0], df["response_0"][0], df["response_1"][0]) == ("hi", "hello", "go away")


def test_trl_bad_type_is_named(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                      {"prompt": "b", "chosen": 3, "rejected": "y"}])
    with pytest.raises(InputError, match=r"record 2, field 'chosen'"):
        load_preferences(f)


def test_hh_transcripts(tmp_path):
    t = "\n\nHuman: how do I bake?\n\nAssistant: Which cake?\n\nHuman: chocolate\n\nAssistant:"
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write(json.dumps({"chosen": t + " Here is a recipe.", "rejected": t + " No."}) + "\n")
    df = load_preferences(f)
    assert df.attrs["schema"] == "hh"
    assert df["prompt"][0] == "Human: how do I bake?\n\nAssistant: Which cake?\n\nHuman: chocolate"
    assert (df["response_0"][0], df["response_1"][0]) == ("Here is a recipe.", "No.")
    assert split_transcript("\n\nHuman: x\n\nAssistant: y") == ("Human: x", "y")
    with pytest.raises(ValueError):
        split_transcript("Human: no assistant turn")


def test_hh_without_assistant_turn_is_named(tmp_path):
    f = _jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a"}])
    with pytest.raises(InputError, match=r"record 1, field 'rejected'"):
        load_preferences(f)
