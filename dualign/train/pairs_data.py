"""Preference pairs on their way into training: `validate_pairs` checks a pairs table,
`tokenize_pairs` turns it into token ids (through `dualign.models.text.encode_pairs`, the
tokenization every stage uses), `PreferenceDataset` serves them with labels and reference
log-probs, `PreferenceCollator` pads them into a batch (concatenated or shared-prompt layout) and
`EpochSeededLengthSampler` orders them by (seed, epoch) so a resumed run replays the same batches.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from ..models.text import encode_pairs, pad_pairs
from ..runio import array_digest
from .preference_config import PreferenceConfig

PAIR_COLUMNS = ("prompt", "response_0", "response_1", "label")


def validate_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Check a pairs table: columns prompt, response_0, response_1, label (p in [0, 1]); an
    optional `offset` column (finite, ≥ 0: the logit margin of `pseudo_preference_loss`).

    Returns
    -------
    pandas.DataFrame with a fresh 0..n-1 index.

    Raises
    ------
    InputError
        Missing column, empty table, non-string text, a label outside [0, 1], or a negative
        or non-finite offset.
    """
    if not isinstance(pairs, pd.DataFrame):
        raise InputError(f"pairs must be a pandas DataFrame, not {type(pairs).__name__}")
    for c in PAIR_COLUMNS:
        if c not in pairs.columns:
            raise InputError(f"missing column (columns are: {', '.join(map(str, pairs.columns))})",
                             field=c)
    if len(pairs) == 0:
        raise InputError("no preference pairs to train on")
    pairs = pairs.reset_index(drop=True)
    for c in PAIR_COLUMNS[:3]:
        bad = ~pairs[c].map(lambda v: isinstance(v, str))
        if bad.any():
            raise InputError("expected text", record=int(np.flatnonzero(bad.to_numpy())[0]), field=c)
    lab = pd.to_numeric(pairs["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~((lab >= 0) & (lab <= 1))
    if bad.any():
        raise InputError("label must be a probability in [0, 1]",
                         record=int(np.flatnonzero(bad)[0]), field="label")
    if "offset" in pairs.columns:
        off = pd.to_numeric(pairs["offset"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(off) & (off >= 0))
        if bad.any():
            raise InputError("offset must be a finite number >= 0", record=int(np.flatnonzero(bad)[0]),
                             field="offset")
    return pairs


def tokenize_pairs(tokenizer, pairs: pd.DataFrame, config: PreferenceConfig) -> list[dict]:
    """Token ids of every pair, as `encode_pairs` makes them.

    Returns
    -------
    list of dict, length n
        Keys `prompt_ids`, `response_ids_0`, `response_ids_1` (lists of int). The prompt
        is tokenized with each response separately, so truncation may cut it differently
        for y0 and y1; `prompt_ids_0`/`prompt_ids_1` hold each version.
    """
    prompts = pairs["prompt"].tolist()
    kw = dict(template=config.template, append_eos=config.append_eos, max_length=config.max_length)
    enc0 = encode_pairs(tokenizer, prompts, pairs["response_0"].tolist(), **kw)
    enc1 = encode_pairs(tokenizer, prompts, pairs["response_1"].tolist(), **kw)
    if config.max_response_length:
        cut = config.max_response_length
        enc0, enc1 = ([(p, r[:cut]) for p, r in enc] for enc in (enc0, enc1))
    return [{"prompt_ids_0": p0, "response_ids_0": r0, "prompt_ids_1": p1, "response_ids_1": r1}
            for (p0, r0), (p1, r1) in zip(enc0, enc1)]


def _tokens_digest(feats: list[dict]) -> str:
    flat = []
    for f in feats:
        for k in ("prompt_ids_0", "response_ids_0", "prompt_ids_1", "response_ids_1"):
            flat.extend(f[k])
            flat.append(-1)  # separator, so different splits of the same ids differ
    return array_digest(np.asarray(flat, dtype=np.int64))


class PreferenceDataset:
    """Map-style dataset of tokenized pairs with labels and reference log-probs.

    Parameters
    ----------
    features : list of dict
        From `tokenize_pairs`.
    labels, ref_logp_0, ref_logp_1 : array_like, shape (n,)
    offsets : array_like, shape (n,), optional
        Per-pair logit margins (`pseudo_preference_loss`); default 0.
    """

    def __init__(self, features, labels, ref_logp_0, ref_logp_1, offsets=None):
        n = len(features)
        offsets = np.zeros(n) if offsets is None else offsets
        for name, a in (("labels", labels), ("ref_logp_0", ref_logp_0), ("ref_logp_1", ref_logp_1),
                        ("offsets", offsets)):
            if len(a) != n:
                raise ValueError(f"{name} has {len(a)} rows but there are {n} pairs")
        self.features = features
        self.labels = np.asarray(labels, dtype=np.float64)
        self.ref_logp_0 = np.asarray(ref_logp_0, dtype=np.float64)
        self.ref_logp_1 = np.asarray(ref_logp_1, dtype=np.float64)
        self.offsets = np.asarray(offsets, dtype=np.float64)
        # a batch is padded to its longest sequence, y0 or y1
        self.lengths = [max(len(f["prompt_ids_0"]) + len(f["response_ids_0"]),
                            len(f["prompt_ids_1"]) + len(f["response_ids_1"])) for f in features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {**self.features[i], "label": self.labels[i], "offset": self.offsets[i],
                "ref_logp_0": self.ref_logp_0[i], "ref_logp_1": self.ref_logp_1[i]}


class PreferenceCollator:
    """Pad a list of pairs into one batch.

    Two layouts. Concatenated (default, always valid): the B y1-sequences, then the B
    y0-sequences, each prompt + response, right-padded. Shared prompt (`share_prompt=True`
    and every pair's y0 and y1 carry the same prompt ids): each prompt once, left-padded,
    and the 2B responses separately, so the prompt runs through the model once per pair
    instead of twice (the trainer reuses its key/value cache for both responses).

    Returns (as a dict of tensors)
    ------------------------------
    Concatenated layout:
        input_ids, attention_mask, response_mask : torch.LongTensor, shape (2B, T)
            `response_mask` is 1 on response tokens only (prompt and padding masked out of
            the log-probs).
    Shared-prompt layout:
        prompt_input_ids, prompt_attention_mask : torch.LongTensor, shape (B, P), left-padded
        input_ids, attention_mask, response_mask : torch.LongTensor, shape (2B, R)
            Responses only, right-padded, interleaved: row 2i is y1 of pair i, row 2i+1 its y0.
    Items that carry the frozen blocks' output (`block_input_prompt_1`, `block_input_response_1`,
    ..._0: float tensors (n_tokens, hidden), `cache_frozen_blocks`) add, padded like the ids:
    `inputs_embeds` (2B, T or R, hidden) and, shared-prompt layout, `prompt_inputs_embeds`
    (B, P, hidden).
    Both:
        pref_label : torch.FloatTensor, shape (B,)
            p = P(y1 preferred). (Not called `labels`: `Trainer` would treat it as token labels.)
        ref_logp_1, ref_logp_0 : torch.FloatTensor, shape (B,)
        pref_offset : torch.FloatTensor, shape (B,)
            The pairs' logit margins (0 unless the pairs have an `offset` column).
    """

    def __init__(self, pad_token_id: int, share_prompt: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.share_prompt = share_prompt

    def __call__(self, items: list[dict]) -> dict:
        import torch

        f32 = lambda k: torch.tensor([float(it[k]) for it in items], dtype=torch.float32)  # noqa: E731
        out = {"pref_label": f32("label"), "ref_logp_1": f32("ref_logp_1"),
               "ref_logp_0": f32("ref_logp_0"),
               "pref_offset": torch.tensor([float(it.get("offset", 0.0)) for it in items], dtype=torch.float32)}
        if self.share_prompt and all(it["prompt_ids_0"] == it["prompt_ids_1"] for it in items):
            pid, pm, _, _ = pad_pairs([(it["prompt_ids_1"], []) for it in items], self.pad_token_id, "left")
            P = pid.shape[1]
            ids, att, _ = self._pad([([], r) for it in items
                                     for r in (it["response_ids_1"], it["response_ids_0"])])
            out.update(prompt_input_ids=pid, prompt_attention_mask=pm, input_ids=ids,
                       attention_mask=att, response_mask=att.clone())
            if "block_input_response_1" in items[0]:
                out["prompt_inputs_embeds"] = _pad_states([it["block_input_prompt_1"] for it in items], P, left=True)
                out["inputs_embeds"] = _pad_states([it[f"block_input_response_{j}"] for it in items for j in (1, 0)],
                                                   ids.shape[1])
            return out
        ids, att, resp = self._pad([(it["prompt_ids_1"], it["response_ids_1"]) for it in items]
                                   + [(it["prompt_ids_0"], it["response_ids_0"]) for it in items])
        out.update(input_ids=ids, attention_mask=att, response_mask=resp)
        if "block_input_response_1" in items[0]:
            seqs = [torch.cat([it[f"block_input_prompt_{j}"], it[f"block_input_response_{j}"]])
                    for j in (1, 0) for it in items]
            out["inputs_embeds"] = _pad_states(seqs, ids.shape[1])
        return out

    def _pad(self, seqs):
        """Right-padded (prompt + response) rows: input ids, attention mask, response mask."""
        ids, att, _, resp = pad_pairs(seqs, self.pad_token_id, "right")
        return ids, att, resp


def _pad_states(seqs, T: int, left: bool = False):
    """Stack hidden-state sequences (each (n_i, hidden)) into (len(seqs), T, hidden), zeros
    in the padding (masked out wherever it is used), on the left or the right."""
    out = seqs[0].new_zeros((len(seqs), T, seqs[0].shape[-1]))
    for i, h in enumerate(seqs):
        if left:
            out[i, T - len(h):] = h
        else:
            out[i, :len(h)] = h
    return out


class EpochSeededLengthSampler:
    """Sample order that depends only on (seed, epoch): length-grouped or a plain shuffle.

    Length grouping follows `transformers.trainer_pt_utils.get_length_grouped_indices`
    (shuffle, sort mega-batches by length, longest batch first). Seeding per epoch instead
    of drawing from the global RNG makes a resumed run replay the same batches.
    """

    def __init__(self, lengths, batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.group_by_length:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))
        return iter(torch.randperm(len(self.lengths), generator=g).tolist())
