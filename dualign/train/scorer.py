"""Train reward and cost models as linear heads on a frozen backbone (`dualign train-scorer`).

- Reward model: Bradley–Terry pairwise loss on `better_response_id`,
  `-log σ(r(x, y_better) - r(x, y_worse))`.
- Cost model, as in Safe RLHF (Dai et al. 2023): the pairwise loss on `safer_response_id`
  (the less safe answer gets the higher cost) plus a classification term
  `-log σ(s·c(x, y))` with `s = +1` for an unsafe answer and `-1` for a safe one, so that
  `cost > 0` means unsafe and `safety = -cost` has a meaningful sign.

The backbone is frozen: features are computed once (cached on disk, keyed by backbone,
settings and the texts) and the head is fitted full-batch with L-BFGS in float64 in well
under a second. The L2 strength is chosen by k-fold cross-validation on the training pairs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

DEFAULT_BACKBONE = "smollm2-135m-instruct"
DEFAULT_POOLING = "mean"
# Prompt templates for scoring, by backbone. SmolLM2's chat template inserts a default system
# prompt ("You are a helpful AI assistant named SmolLM...") that carries no information about
# the pair but is ~30% of a short pair's tokens; the scorer's features are the same kind of
# thing without it and cost a third less to compute.
SCORER_TEMPLATES = {
    "smollm2-135m-instruct": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
}


def resolve_template(backbone: str, template: str | None) -> str | None:
    """"auto" -> the backbone's entry in `SCORER_TEMPLATES`, else None (its chat template);
    anything else is returned as given.

    Raises
    ------
    InputError
        A template without a `{prompt}` slot.
    """
    if template == "auto":
        return SCORER_TEMPLATES.get(str(backbone).lower())
    if template is not None and "{prompt}" not in template:
        raise InputError("a template needs a {prompt} slot", field="template")
    return template
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


# ----------------------------------------------------------------------------- losses

def bradley_terry_loss(s_preferred, s_other):
    """Mean Bradley–Terry loss `-log σ(s_preferred - s_other)`.

    Parameters
    ----------
    s_preferred, s_other : torch.Tensor, shape (n,)

    Returns
    -------
    torch.Tensor, scalar
    """
    import torch.nn.functional as F

    return F.softplus(-(s_preferred - s_other)).mean()


def cost_loss(c_safer, c_unsafer, sign_safer=None, sign_unsafer=None, sign_weight: float = 1.0,
              rank_both_safe: bool = True):
    """Safe-RLHF cost-model loss.

    `mean over ranked pairs of -log σ(c_unsafer - c_safer) + sign_weight · mean over labeled
    answers of -log σ(s · c)`, with `s = +1` (unsafe), `-1` (safe) or `0` (no label: left out).
    Every pair is ranked, except, with `rank_both_safe=False`, pairs whose two answers are both
    labelled safe.

    Parameters
    ----------
    c_safer, c_unsafer : torch.Tensor, shape (n,)
        Costs of the safer and of the less safe answer of each pair.
    sign_safer, sign_unsafer : torch.Tensor, shape (n,), optional
        Safety signs of those answers; None: no classification term.
    sign_weight : float
    rank_both_safe : bool
        True (Safe RLHF): rank every pair by `safer_response_id`. False: a pair of two safe
        answers feeds only the sign term. Ranking two safe answers teaches that the one saying
        less is safer, so a refusal of a benign request wins, and a policy pushed up that cost
        model learns to refuse everything (see `ScorerTrainConfig.rank_both_safe`).

    Returns
    -------
    torch.Tensor, scalar
    """
    import torch
    import torch.nn.functional as F

    pair = F.softplus(-(c_unsafer - c_safer))
    if rank_both_safe or sign_safer is None:
        loss = pair.mean()
    else:
        ranked = ~((sign_safer < 0) & (sign_unsafer < 0))
        loss = pair[ranked].mean() if ranked.any() else pair.sum() * 0
    if sign_safer is None or sign_weight == 0:
        return loss
    c = torch.cat([c_safer, c_unsafer])
    s = torch.cat([sign_safer, sign_unsafer]).to(c.dtype)
    m = s != 0
    if m.any():
        loss = loss + sign_weight * F.softplus(-(s[m] * c[m])).mean()
    return loss


# ----------------------------------------------------------------------------- head fitting

def fit_head(x_pref, x_other, *, kind: str, sign_pref=None, sign_other=None, l2: float = 0.1,
             sign_weight: float = 1.0, rank_both_safe: bool = True, max_iter: int = 500):
    """Fit `score = w·x + b` on (already standardized) features by full-batch L-BFGS.

    Parameters
    ----------
    x_pref, x_other : numpy.ndarray, shape (n, d)
        Features of the preferred answer (better for reward, safer for cost) and of the
        other one.
    kind : {"reward", "cost"}
        Reward: the preferred answer scores higher; no bias (it cancels in the pairwise
        loss). Cost: the preferred (safer) answer costs less; the bias is fitted through
        the sign term.
    sign_pref, sign_other : numpy.ndarray, shape (n,), optional
        Cost only: +1 unsafe, -1 safe, 0 unknown.
    l2 : float
        Penalty `l2/2 · |w|²` added to the mean loss.

    Returns
    -------
    (w, b) : (numpy.ndarray of shape (d,), float)
    """
    import torch

    xp = torch.as_tensor(np.asarray(x_pref), dtype=torch.float64)
    xo = torch.as_tensor(np.asarray(x_other), dtype=torch.float64)
    d = xp.shape[1]
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=(kind == "cost"))
    sp = None if sign_pref is None else torch.as_tensor(np.asarray(sign_pref), dtype=torch.float64)
    so = None if sign_other is None else torch.as_tensor(np.asarray(sign_other), dtype=torch.float64)
    params = [w, b] if kind == "cost" else [w]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        sp_, so_ = xp @ w + b, xo @ w + b
        if kind == "reward":
            loss = bradley_terry_loss(sp_, so_)
        else:
            loss = cost_loss(sp_, so_, sp, so, sign_weight, rank_both_safe)
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach().numpy().copy(), float(b.detach())


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def choose_l2(x_pref, x_other, *, kind, sign_pref=None, sign_other=None, sign_weight=1.0,
              rank_both_safe: bool = True, grid=L2_GRID, k: int = 4, seed: int = 0) -> tuple[float, dict]:
    """The L2 strength of `grid` with the lowest k-fold held-out loss on the training pairs.

    Returns
    -------
    (l2, scores) : (float, dict mapping each l2 to its mean held-out pairwise accuracy and loss)
    """
    import torch

    n = len(x_pref)
    k = max(2, min(k, n))
    folds = _folds(n, k, seed)
    scores = {}
    for l2 in grid:
        losses, accs = [], []
        for f in folds:
            tr = np.setdiff1d(np.arange(n), f)
            sgp = None if sign_pref is None else sign_pref[tr]
            sgo = None if sign_other is None else sign_other[tr]
            w, b = fit_head(x_pref[tr], x_other[tr], kind=kind, sign_pref=sgp, sign_other=sgo,
                            l2=l2, sign_weight=sign_weight, rank_both_safe=rank_both_safe)
            sp_, so_ = x_pref[f] @ w + b, x_other[f] @ w + b
            t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
            if kind == "reward":
                loss = bradley_terry_loss(t(sp_), t(so_))
                accs.append(np.mean(sp_ > so_))
            else:
                loss = cost_loss(t(sp_), t(so_), None if sign_pref is None else t(sign_pref[f]),
                                 None if sign_other is None else t(sign_other[f]), sign_weight, rank_both_safe)
                accs.append(np.mean(sp_ < so_))
            losses.append(float(loss))
        scores[l2] = {"accuracy": float(np.mean(accs)), "loss": float(np.mean(losses))}
    best = min(grid, key=lambda v: (scores[v]["loss"], -v))
    return best, scores


# ----------------------------------------------------------------------------- metrics

def pair_metrics(s0, s1, df: pd.DataFrame, kind: str) -> dict:
    """Held-out metrics of a scorer's raw outputs `s0`, `s1` (shape (n,)) on the pairs of `df`.

    Reward: `pairwise_accuracy` = fraction of pairs where the better answer scores higher.
    Cost: `pairwise_accuracy` = fraction where the less safe answer costs more;
    `sign_accuracy` = fraction of labeled answers with `cost > 0` exactly when unsafe;
    `pairwise_accuracy_mixed` = pairwise accuracy on pairs with one safe and one unsafe answer.
    Ties count as errors.
    """
    s0, s1 = np.asarray(s0, dtype=float), np.asarray(s1, dtype=float)
    if kind == "reward":
        ids = df["better_response_id"].to_numpy()
        correct = np.where(ids == 0, s0 > s1, s1 > s0)
        return {"n_pairs": int(len(df)), "pairwise_accuracy": float(correct.mean())}
    ids = df["safer_response_id"].to_numpy()
    correct = np.where(ids == 0, s1 > s0, s0 > s1)
    out = {"n_pairs": int(len(df)), "pairwise_accuracy": float(correct.mean())}
    safe0, safe1 = df["is_response_0_safe"], df["is_response_1_safe"]
    lab = (~safe0.isna()).to_numpy() & (~safe1.isna()).to_numpy()
    if lab.any():
        y = np.concatenate([~safe0[lab].to_numpy(bool), ~safe1[lab].to_numpy(bool)])  # True = unsafe
        c = np.concatenate([s0[lab], s1[lab]])
        out["sign_accuracy"] = float(((c > 0) == y).mean())
        out["unsafe_rate_true"] = float(y.mean())
        mixed = lab & (safe0.fillna(False).to_numpy(bool) != safe1.fillna(False).to_numpy(bool))
        if mixed.any():
            out["n_pairs_mixed"] = int(mixed.sum())
            out["pairwise_accuracy_mixed"] = float(correct[mixed].mean())
    return out


# ----------------------------------------------------------------------------- training

@dataclass
class ScorerTrainConfig:
    """Settings of `train_scorer`.

    Attributes
    ----------
    kind : {"reward", "cost"}
    backbone : str
        `load_backbone` spec; default the embedded SmolLM2.
    pooling : {"last", "mean"}
    template : str, optional
        Prompt template for causal backbones: "auto" (default) picks the backbone's entry in
        `SCORER_TEMPLATES`, else the tokenizer's chat template; None: the chat template.
    max_length : int
        Longest (prompt + response) in tokens.
    l2 : float, optional
        Fixed L2 strength; None: chosen by 4-fold CV over `L2_GRID`.
    sign_weight : float
        Weight of the cost model's classification term (Safe RLHF uses 1).
    rank_both_safe : bool
        Cost only. False (default): a pair whose two answers are both labelled safe feeds only
        the sign term (both cost < 0), not the pairwise ranking. True: Safe RLHF's loss, which
        ranks every pair by `safer_response_id`. Between two safe answers that label usually
        marks the one that says less, so a refusal of a benign request "wins", the cost model
        prices helpfulness as risk, and a policy aligned to it refuses benign requests too.
    test_fraction : float
        Held-out share of prompts when no test set is given.
    seed : int
    batch_size : int
        Pairs per forward pass when extracting features.
    """

    kind: str = "reward"
    backbone: str = DEFAULT_BACKBONE
    pooling: str = DEFAULT_POOLING
    template: str | None = "auto"
    max_length: int = 512
    l2: float | None = None
    sign_weight: float = 1.0
    rank_both_safe: bool = False
    test_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 16


@dataclass
class ScorerTrainResult:
    """What `train_scorer` returns: the scorer, where it was saved, and its metrics."""

    scorer: object
    directory: Path | None
    metrics: dict = field(default_factory=dict)


def split_by_prompt(df: pd.DataFrame, test_fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split pairs so that all pairs of a prompt land on the same side.

    Raises
    ------
    InputError
        Fewer than 2 distinct prompts, or a fraction outside (0, 1).
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"test fraction must be in (0, 1), got {test_fraction}")
    prompts = df["prompt"].unique()
    if len(prompts) < 2:
        raise InputError("need at least 2 distinct prompts to hold some out")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    n_test = min(len(prompts) - 1, max(1, int(round(test_fraction * len(prompts)))))
    test_prompts = set(prompts[order[:n_test]])
    is_test = df["prompt"].isin(test_prompts).to_numpy()
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def _signs(safe: pd.Series) -> np.ndarray:
    """+1 unsafe, -1 safe, 0 unknown."""
    out = np.zeros(len(safe))
    known = (~safe.isna()).to_numpy()
    out[known] = np.where(safe[known].to_numpy(bool), -1.0, 1.0)
    return out


def _pair_features(cfg: ScorerTrainConfig, df: pd.DataFrame, cache_dir, loaded, desc):
    from ..models.features import cached_features

    p = df["prompt"].tolist()
    x, loaded = cached_features(cfg.backbone, p + p, df["response_0"].tolist() + df["response_1"].tolist(),
                                pooling=cfg.pooling, template=cfg.template, max_length=cfg.max_length,
                                cache_dir=cache_dir, loaded=loaded, batch_size=cfg.batch_size, desc=desc)
    n = len(df)
    return x[:n], x[n:], loaded


def train_scorer(train_df: pd.DataFrame, config: ScorerTrainConfig, *, test_df: pd.DataFrame | None = None,
                 out_dir=None, cache_dir=None, loaded=None, log=print, source: dict | None = None
                 ) -> ScorerTrainResult:
    """Train a reward or cost head on a frozen backbone and report held-out accuracy.

    Parameters
    ----------
    train_df : pandas.DataFrame
        Normalized preference pairs (`dualign.data.preferences.load_preferences`).
    config : ScorerTrainConfig
    test_df : pandas.DataFrame, optional
        Held-out pairs; default: `config.test_fraction` of the prompts of `train_df`.
    out_dir : path, optional
        Where to save the `HeadScorer` (atomically); None: not saved.
    cache_dir : path, optional
        Feature cache (default `<dualign cache>/features`).
    loaded : (model, tokenizer), optional
        An already loaded backbone to reuse.
    log : callable
        Receives one-line progress messages.
    source : dict, optional
        Provenance recorded in the scorer config (e.g. data paths and digests).

    Returns
    -------
    ScorerTrainResult
        `.scorer` (a `HeadScorer`, its backbone attached when one was loaded), `.directory`,
        `.metrics` {"train": ..., "test": ..., "l2": ..., "cv": ..., "seconds": ...}.

    Raises
    ------
    InputError
        Unknown kind, a cost model without safety labels, or too few pairs.
    """
    from ..models.head_scorer import HeadScorer

    kind = config.kind
    if kind not in ("reward", "cost"):
        raise InputError(f"kind must be 'reward' or 'cost', not {kind!r}", field="kind")
    if kind == "cost" and (train_df["safer_response_id"] < 0).any():
        raise InputError("a cost model needs safer_response_id labels", field="safer_response_id")
    config = replace(config, template=resolve_template(config.backbone, config.template))
    if test_df is None:
        train_df, test_df = split_by_prompt(train_df, config.test_fraction, config.seed)
    if len(train_df) < 4:
        raise InputError(f"too few training pairs ({len(train_df)}); need at least 4")
    t0 = time.perf_counter()
    x0, x1, loaded = _pair_features(config, train_df, cache_dir, loaded, f"{kind}: train features")
    tx0, tx1, loaded = _pair_features(config, test_df, cache_dir, loaded, f"{kind}: test features")
    t_feat = time.perf_counter() - t0

    # standardize with training statistics: L2 then treats every feature dimension alike
    allx = np.concatenate([x0, x1]).astype(np.float64)
    mean, std = allx.mean(0), allx.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    z0, z1 = (x0 - mean) / std, (x1 - mean) / std

    label = "better" if kind == "reward" else "safer"
    ids = train_df[f"{label}_response_id"].to_numpy()
    zp, zo = np.where(ids[:, None] == 0, z0, z1), np.where(ids[:, None] == 0, z1, z0)
    sgp = sgo = None
    if kind == "cost":
        s0, s1 = _signs(train_df["is_response_0_safe"]), _signs(train_df["is_response_1_safe"])
        sgp, sgo = np.where(ids == 0, s0, s1), np.where(ids == 0, s1, s0)
        if not (s0.any() or s1.any()):
            sgp = sgo = None  # no per-answer labels (TRL/HH sets): pairwise term only
    t1 = time.perf_counter()
    cv = {}
    l2 = config.l2
    if l2 is None:
        l2, cv = choose_l2(zp, zo, kind=kind, sign_pref=sgp, sign_other=sgo, sign_weight=config.sign_weight,
                           rank_both_safe=config.rank_both_safe, seed=config.seed)
    w, b = fit_head(zp, zo, kind=kind, sign_pref=sgp, sign_other=sgo, l2=l2, sign_weight=config.sign_weight,
                    rank_both_safe=config.rank_both_safe)
    t_fit = time.perf_counter() - t1

    head = HeadScorer(kind, config.backbone, w, b, mean, std, pooling=config.pooling,
                      template=config.template, max_length=config.max_length, batch_size=config.batch_size)
    if loaded is not None:
        head.use_backbone(*loaded)
    m_train = pair_metrics(head.score_features(x0), head.score_features(x1), train_df, kind)
    m_test = pair_metrics(head.score_features(tx0), head.score_features(tx1), test_df, kind)
    metrics = {"train": m_train, "test": m_test, "l2": l2,
               "cv": {str(k): v for k, v in cv.items()},
               "seconds": {"features": round(t_feat, 2), "fit": round(t_fit, 2)}}
    head.meta = {"training": {**{k: v for k, v in asdict(config).items() if k != "batch_size"},
                              "loss": "bradley_terry" if kind == "reward" else "safe_rlhf_cost",
                              "n_train_pairs": int(len(train_df)), "n_test_pairs": int(len(test_df)),
                              "l2": l2, **({"source": source} if source else {})},
                 "metrics": {"train": m_train, "test": m_test}}
    msg = f"{kind} model: held-out pairwise accuracy {m_test['pairwise_accuracy']:.3f} ({m_test['n_pairs']} pairs)"
    if "sign_accuracy" in m_test:
        msg += f", sign accuracy {m_test['sign_accuracy']:.3f}"
    log(msg + f"; train {m_train['pairwise_accuracy']:.3f}; l2={l2:g}; "
        f"features {t_feat:.1f}s, fit {t_fit:.1f}s")
    directory = head.save(out_dir) if out_dir is not None else None
    return ScorerTrainResult(head, Path(directory) if directory else None, metrics)
