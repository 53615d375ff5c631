"""The dual side of the primal–dual loop: episodes in, λ out.

- `lagrange_step`: λ ← clip(λ − η (ḡ_window − t), 0, λ_max), pure numpy.
- `LagrangeState`: λ, the window of the last `cost_window` episodes' safety scores (a deque),
  token counts and the per-step log; JSON round trip for checkpoints.
- `met_streak`: how many of the last logged steps met every constraint (`stop_when_met`).
- `ShapedReward`: GRPO's reward function r + λᵀg with the current λ; records the episodes.
- `PrimalDualCallback` (`_callback_class`, built on first use: it needs transformers): between
  optimizer steps, feeds the new episodes into the window, takes one `lagrange_step`, logs a row
  per step to `primal_dual_log.jsonl` and saves the state into every checkpoint.

`dualign.train.primal_dual` wires them into TRL's `GRPOTrainer` and re-exports them.
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

from ..runio import atomic_path, write_json
from .primal_dual_config import STATE_FILE


# ---------------------------------------------------------------------------------------
# the dual update

def met_streak(rows: Sequence[dict], cost_window: int) -> int:
    """How many of the last log rows (`PrimalDualCallback`'s, oldest first) in a row have every
    constraint met: a full window (`window_size` ≥ `cost_window`) whose mean reaches each target
    (every `slack` ≥ 0). 0 when the last row misses. Recomputed from the log, so a resumed run
    counts the steps before its interruption."""
    n = 0
    for r in reversed(rows):
        slack = r.get("slack") or {}
        if r.get("window_size", 0) < cost_window or not slack or \
                any(v is None or v < 0 for v in slack.values()):
            break
        n += 1
    return n


def lagrange_step(lam, window_safety_means, targets, lr: float, lam_max) -> np.ndarray:
    """One projected dual-ascent step on the constraint slack.

        λ ← clip(λ − lr · (ḡ − t), 0, λ_max)

    λ rises while a constraint is violated (ḡ < t) and falls toward 0 while it is slack.
    (On the dual function D of the design doc, ḡ − t estimates ∇D(λ), so this is projected
    gradient descent on D: it converges to λ* for lr small next to β / Var(g).)

    Parameters
    ----------
    lam : float or array_like, shape (m,)
        Current multipliers, each in [0, λ_max].
    window_safety_means : float or array_like, shape (m,)
        ḡ_j: mean safety score (higher = safer) of the recent episodes.
    targets : float or array_like, shape (m,)
        t_j: the level each constraint asks for, E_π[g_j] ≥ t_j.
    lr : float
        Step size, > 0.
    lam_max : float or array_like, shape (m,)
        Upper clip, > 0.

    Returns
    -------
    numpy.ndarray, shape (m,) (m = 1 for scalar inputs), float64.

    Raises
    ------
    ValueError
        Shapes that do not broadcast to (m,), a non-finite value, lr ≤ 0 or λ_max ≤ 0.
    """
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    g = np.atleast_1d(np.asarray(window_safety_means, dtype=np.float64))
    t = np.atleast_1d(np.asarray(targets, dtype=np.float64))
    top = np.atleast_1d(np.asarray(lam_max, dtype=np.float64))
    if lam.ndim != 1 or any(a.ndim != 1 or len(a) not in (1, len(lam)) for a in (g, t, top)):
        raise ValueError(f"shapes do not match λ's ({lam.shape}): means {g.shape}, targets {t.shape}, "
                         f"lam_max {top.shape}")
    for name, a in (("lam", lam), ("window_safety_means", g), ("targets", t), ("lam_max", top)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {a}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr}")
    if np.any(top <= 0):
        raise ValueError(f"lam_max must be > 0, got {top}")
    return np.clip(lam - lr * (g - t), 0.0, top)


class LagrangeState:
    """λ, the episode window, token counts and the per-step log of one run.

    Attributes
    ----------
    names : list of str, length m
        Constraint names (the safety scorers' keys).
    lam : numpy.ndarray, shape (m,)
        The multipliers that shape the next rewards.
    targets : numpy.ndarray, shape (m,)
    window : collections.deque of numpy.ndarray (m,), maxlen `cost_window`
        Safety scores of the most recent episodes (one completion each), oldest first.
    generated_tokens, trained_tokens : int
        Totals over the run (over resumptions too). Generated: completion tokens sampled.
        Trained: prompt + completion tokens of every sequence in a training forward/backward
        pass (unpadded; each of GRPO's `num_iterations` passes counts; the no-grad reference
        and old-policy passes do not).
    history : list of dict
        One row per optimizer step (`PrimalDualCallback`).
    pending : dict of lists
        Episodes scored since the last dual update (the reward function fills it).
    """

    def __init__(self, names, lam, targets, cost_window: int):
        self.names = list(names)
        self.lam = np.asarray(lam, dtype=np.float64).reshape(len(self.names)).copy()
        self.targets = np.asarray(targets, dtype=np.float64).reshape(len(self.names)).copy()
        self.window: deque = deque(maxlen=int(cost_window))
        self.generated_tokens = 0
        self.trained_tokens = 0
        self.history: list[dict] = []
        self.pending = self._empty_pending()

    @staticmethod
    def _empty_pending() -> dict:
        return {"reward": [], "safety": [], "shaped": [], "generated_tokens": 0, "trained_tokens": 0}

    def record(self, reward, safety, shaped, generated_tokens: int, trained_tokens: int) -> None:
        """Add a scored batch of episodes: reward, shaped (n,), safety (n, m), token counts."""
        p = self.pending
        p["reward"].extend(np.asarray(reward, dtype=np.float64).tolist())
        p["shaped"].extend(np.asarray(shaped, dtype=np.float64).tolist())
        p["safety"].extend(np.asarray(safety, dtype=np.float64).reshape(-1, len(self.names)).tolist())
        p["generated_tokens"] += int(generated_tokens)
        p["trained_tokens"] += int(trained_tokens)

    def window_means(self) -> np.ndarray:
        """Mean safety of the episodes in the window, shape (m,) (NaN when empty)."""
        if not self.window:
            return np.full(len(self.names), np.nan)
        return np.mean(np.stack(list(self.window)), axis=0)

    def update(self, lr: float, lam_max: float, pending: dict | None = None) -> dict | None:
        """Move the pending episodes into the window and take one `lagrange_step`.

        Returns the step's facts (λ before and after, slack, batch means, token counts), or
        None when no episode arrived since the last update (λ is then left as it is: the
        window has not changed, and stepping on the same evidence twice would double count it).
        """
        p = self.pending if pending is None else pending
        self.pending = self._empty_pending()
        if not p["reward"]:
            return None
        safety = np.asarray(p["safety"], dtype=np.float64).reshape(-1, len(self.names))
        for row in safety:
            self.window.append(row)
        means = self.window_means()
        before = self.lam.copy()
        self.lam = lagrange_step(before, means, self.targets, lr, lam_max)
        self.generated_tokens += p["generated_tokens"]
        self.trained_tokens += p["trained_tokens"]
        return {"lambda_used": before, "lambda": self.lam.copy(), "window_safety": means,
                "slack": means - self.targets, "window_size": len(self.window),
                "episodes": len(p["reward"]), "reward": float(np.mean(p["reward"])),
                "shaped_reward": float(np.mean(p["shaped"])), "safety": safety.mean(axis=0),
                "generated_tokens": p["generated_tokens"], "trained_tokens": p["trained_tokens"]}

    def to_dict(self) -> dict:
        return {"names": self.names, "lambda": self.lam.tolist(), "targets": self.targets.tolist(),
                "cost_window": self.window.maxlen, "window": [w.tolist() for w in self.window],
                "generated_tokens": self.generated_tokens, "trained_tokens": self.trained_tokens,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict) -> "LagrangeState":
        s = cls(d["names"], d["lambda"], d["targets"], d["cost_window"])
        for w in d["window"]:
            s.window.append(np.asarray(w, dtype=np.float64))
        s.generated_tokens, s.trained_tokens = int(d["generated_tokens"]), int(d["trained_tokens"])
        s.history = list(d["history"])
        return s

    def lambda_history(self) -> np.ndarray:
        """λ after every step of the log, shape (steps, m)."""
        return np.asarray([[r["lambda"][n] for n in self.names] for r in self.history],
                          dtype=np.float64).reshape(-1, len(self.names))


# ---------------------------------------------------------------------------------------
# the reward GRPO sees

class ShapedReward:
    """GRPO reward function r + λᵀg of (prompt, completion) text pairs, λ read from `state`.

    Called by `GRPOTrainer` as `f(prompts=..., completions=..., completion_ids=..., **columns)`
    with the dataset's `n_prompt_tokens` column among the extra keyword arguments. Scores go
    through the project's scorers (`reward_scorer.reward`, `safety_scorers[name].safety`) on
    the raw user prompt and the decoded completion, as the score stage scores samples.
    """

    __name__ = "primal_dual_reward"  # the name TRL logs the reward under

    def __init__(self, state: LagrangeState, reward_scorer, safety_scorers: dict, num_iterations: int = 1):
        self.state = state
        self.reward_scorer = reward_scorer
        self.safety_scorers = dict(safety_scorers)
        self.num_iterations = int(num_iterations)

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Reward (n,) and safety (n, m) of each pair, oriented (higher = better, safer)."""
        r = np.asarray(self.reward_scorer.reward(list(prompts), list(completions)), dtype=np.float64)
        g = np.stack([np.asarray(self.safety_scorers[n].safety(list(prompts), list(completions)), dtype=np.float64)
                      for n in self.state.names], axis=1)
        return r, g

    def __call__(self, prompts, completions, completion_ids=None, n_prompt_tokens=None, log_metric=None, **_):
        r, g = self.scores(prompts, completions)
        lam = self.state.lam
        shaped = r + g @ lam
        generated = sum(len(c) for c in completion_ids) if completion_ids is not None else 0
        prompt_tokens = sum(int(n) for n in n_prompt_tokens) if n_prompt_tokens is not None else 0
        self.state.record(r, g, shaped, generated, self.num_iterations * (prompt_tokens + generated))
        if log_metric is not None:  # into TRL's own log, averaged per logging step
            log_metric("primal_dual/reward", float(r.mean()))
            for j, n in enumerate(self.state.names):
                log_metric(f"primal_dual/safety/{n}", float(g[:, j].mean()))
                log_metric(f"primal_dual/lambda/{n}", float(lam[j]))
        return shaped.tolist()


# ---------------------------------------------------------------------------------------
# the callback: dual updates, the log, checkpoints

def _callback_class():
    from transformers import TrainerCallback

    class PrimalDualCallback(TrainerCallback):
        """Takes the dual step after each optimizer step, logs it, and saves λ with checkpoints.

        One log row per optimizer step (constraint-keyed values are dicts name → float):
        `step`; `lambda_used` (the λ that shaped this step's rewards) and `lambda` (after the
        dual step); `window_safety` (mean of the window), `slack` (= window_safety − target,
        < 0: violated), `target`, `window_size`; this step's episodes: `episodes`, mean raw
        `reward`, mean `safety`, mean `shaped_reward` (what GRPO's "reward" log shows); token
        counts `generated_tokens`, `trained_tokens` and their running totals (`LagrangeState`);
        from GRPO's log of the step: `kl` (mean per-token KL to π_ref), `loss`, `entropy`,
        `completion_length`, `learning_rate`. A step without new episodes (`num_iterations` > 1)
        has `episodes` 0, None for the batch means, and λ unchanged.

        Parameters
        ----------
        state : LagrangeState
        lambda_lr, lambda_max : float
        log_path : pathlib.Path
            Where the per-step rows are written (JSON Lines, rewritten atomically).
        """

        def __init__(self, state: LagrangeState, lambda_lr: float, lambda_max: float, log_path: Path,
                     stop_when_met: int = 0):
            self.state, self.lr, self.lam_max, self.log_path = state, lambda_lr, lambda_max, Path(log_path)
            self.stop_when_met = stop_when_met

        def on_step_end(self, args, state, control, **kwargs):
            from accelerate.utils import gather_object

            # every process holds its own completions' scores; all take the same step on all of them
            p = self.state.pending
            episodes = gather_object([(r, g, s) for r, g, s in zip(p["reward"], p["safety"], p["shaped"])])
            tokens = gather_object([(p["generated_tokens"], p["trained_tokens"])])
            merged = {"reward": [e[0] for e in episodes], "safety": [e[1] for e in episodes],
                      "shaped": [e[2] for e in episodes], "generated_tokens": sum(t[0] for t in tokens),
                      "trained_tokens": sum(t[1] for t in tokens)}
            facts = self.state.update(self.lr, self.lam_max, merged)
            names = self.state.names
            # constraint-keyed, and JSON-safe (an empty window's NaN mean becomes None)
            per = lambda a: None if a is None else {n: float(v) if np.isfinite(v) else None  # noqa: E731
                                                    for n, v in zip(names, a)}
            if facts is None:  # a step on an earlier generation batch (num_iterations > 1): λ stays
                lam, means = self.state.lam, self.state.window_means()
                facts = {"lambda": lam, "lambda_used": lam, "window_safety": means, "slack": means - self.state.targets,
                         "window_size": len(self.state.window), "reward": None, "safety": None,
                         "shaped_reward": None, "episodes": 0, "generated_tokens": 0, "trained_tokens": 0}
            self.state.history.append({
                "step": int(state.global_step), "lambda": per(facts["lambda"]),
                "lambda_used": per(facts["lambda_used"]), "slack": per(facts["slack"]),
                "window_safety": per(facts["window_safety"]), "window_size": facts["window_size"],
                "target": per(self.state.targets), "reward": facts["reward"], "safety": per(facts["safety"]),
                "shaped_reward": facts["shaped_reward"], "episodes": facts["episodes"],
                "generated_tokens": facts["generated_tokens"], "trained_tokens": facts["trained_tokens"],
                "generated_tokens_total": self.state.generated_tokens,
                "trained_tokens_total": self.state.trained_tokens, "kl": None})
            # every rank holds the same log rows (the dual step runs on the gathered episodes)
            streak = met_streak(self.state.history, self.state.window.maxlen)
            self.state.history[-1]["met_streak"] = streak
            if self.stop_when_met and streak >= self.stop_when_met:
                control.should_training_stop = True
                control.should_save = True  # the stopping step is a checkpoint a rerun finds finished

        def on_log(self, args, state, control, logs=None, **kwargs):
            rows = self.state.history
            if not logs or "train_runtime" in logs or not rows or rows[-1]["step"] != state.global_step:
                return
            # GRPO's metrics of this step (logging_steps = 1): KL to π_ref, loss, entropy, length
            for key, name in (("kl", "kl"), ("loss", "loss"), ("entropy", "entropy"),
                              ("completions/mean_length", "completion_length"), ("learning_rate", "learning_rate")):
                if logs.get(key) is not None:
                    rows[-1][name] = float(logs[key])
            if state.is_world_process_zero:
                self.write_log()

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            cp = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if cp.is_dir():  # what a resumed run restores λ, the window and the log from
                write_json(self.state.to_dict(), cp / STATE_FILE)
            self.write_log()

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.write_log()

        def write_log(self) -> None:
            with atomic_path(self.log_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.state.history))

    return PrimalDualCallback
