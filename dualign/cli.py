"""The `dualign` command. One subcommand per pipeline stage; each is `_add_<name>` (its flags)
plus `cmd_<name>` (what it does). Errors meant for the user print as one line, exit code 2.

One module, though over 500 lines: each `_add_<name>` / `cmd_<name>` pair is small and stands
alone, the shared flag helpers (`_add_sampling_args`, `_add_pipeline`, `_TRUST`) keep the commands'
flags alike, and torch and the other heavy imports happen inside the command that needs them,
so the file's length costs nothing at start-up.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DualignError


def _add_dual(sub):
    p = sub.add_parser("dual", help="solve the dual on scored reference samples (λ*, predictions, CIs)",
                       description="Solve CAN's dual on a long-format score table (one row per prompt × "
                                   "sample): λ*, predicted reward/safety gains with bootstrap CIs, KL, ESS.")
    p.add_argument("scores", help="Parquet, CSV or JSONL with prompt_id, reward and safety columns")
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient β (default 0.1)")
    p.add_argument("--margin", type=float, action="append", dest="margins", metavar="M",
                   help="required safety gain over the reference; once, or once per --safety column "
                        "(without a --max-unsafe-rate)")
    p.add_argument("--max-unsafe-rate", action="append", metavar="[NAME=]R",
                   help="instead of a margin: at most this fraction of unsafe answers (safety < 0) under the "
                        "aligned policy, e.g. 0.05; NAME=R per safety column (NAME: the column, or the part "
                        "after 'safety/'), plain R with one column; repeatable")
    p.add_argument("--reward", default="reward", metavar="COL", help="reward column (default: reward)")
    p.add_argument("--safety", action="append", metavar="COL",
                   help="safety column (higher = safer); repeat for several constraints "
                        "(default: 'safety', else every 'safety/<name>' column)")
    p.add_argument("--prompt-id", default="prompt_id", metavar="COL")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap replicates (default 1000)")
    p.add_argument("--bootstrap-method", choices=("auto", "one-step", "full"), default="auto",
                   help="auto (default): full while prompts × samples × replicates ≤ 2e8, else one-step; "
                        "one-step: one Newton step per replicate from λ*, all replicates at once, "
                        "re-solving only those it cannot trust; full: re-solve the dual on every replicate "
                        "(exact, about 1,000 times slower on 30k prompts)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", help="write dual.json here")
    p.add_argument("--plot", metavar="DIR", help="write the three figures (PNG) into DIR")
    p.set_defaults(func=cmd_dual)
    return p


def cmd_dual(args) -> int:
    from .data.scores import read_score_arrays
    from .errors import InputError
    from .pipelines.dual_stage import format_dual_summary, solve_dual_stage, write_dual_outputs
    from .runio import check_output_dir, check_output_file, file_digest

    # Every output is checked before anything is computed or written: a bad --plot must not
    # find dual.json already written. The names are the figures write_dual_outputs writes.
    if args.out:
        check_output_file(args.out)
    if args.plot:
        check_output_dir(args.plot)
        for name in ("safety_histogram.png", "dual_function.png", "solver_convergence.png"):
            check_output_file(Path(args.plot) / name)
    scores = read_score_arrays(args.scores, args.reward, args.safety, args.prompt_id)
    rates = _unsafe_rates_for(args.max_unsafe_rate, scores.safety_names)
    free = [n for n, r in zip(scores.safety_names, rates) if r is None]
    if args.margins and not free:
        raise InputError(f"both --margin and --max-unsafe-rate for {', '.join(scores.safety_names)}: give one",
                         field="--margin")
    # margins go to the constraints without a rate (the rate constraints' entries are unused)
    given = iter(_margins_for(args.margins, free)) if free else iter(())
    margins = [0.0 if r is not None else next(given) for r in rates]
    d = solve_dual_stage(scores, args.beta, margins, n_boot=args.bootstrap, level=args.level,
                         seed=args.seed, inputs={"scores_file": str(args.scores),
                                                 "scores_file_digest": file_digest(args.scores)},
                         max_unsafe_rate=rates, bootstrap_method=args.bootstrap_method)
    print(format_dual_summary(d))
    for path in write_dual_outputs(d, scores, args.out, args.plot):
        print(f"wrote {path}")
    return 0


def _unsafe_rates_for(values, names) -> list:
    """`--max-unsafe-rate` values ('NAME=R', or 'R' with one safety column) → one entry per
    column of `names`: the rate in [0, 1], or None (a margin constraint).

    Raises
    ------
    InputError
        An unknown or repeated NAME, a bare R with several columns, or R not in [0, 1]."""
    from .dual import check_unsafe_rate
    from .errors import InputError

    out = [None] * len(names)
    for v in values or []:
        key, sep, val = v.rpartition("=")
        if not sep and len(names) != 1:
            raise InputError(f"'{v}' names no constraint and there are {len(names)} safety columns "
                             f"({', '.join(names)}): give NAME=R", field="--max-unsafe-rate")
        hits = [j for j, n in enumerate(names) if key in (n, n.split("/", 1)[-1])] if sep else [0]
        if not hits:
            raise InputError(f"no safety column '{key}' (safety columns: {', '.join(names)})",
                             field="--max-unsafe-rate")
        if out[hits[0]] is not None:
            raise InputError(f"two rates for {names[hits[0]]}", field="--max-unsafe-rate")
        out[hits[0]] = check_unsafe_rate(val, names[hits[0]])
    return out


def _margins_for(margins, names):
    from .errors import InputError

    margins = margins or [0.0]
    if len(margins) == 1:
        return margins * len(names)
    if len(margins) != len(names):
        raise InputError(f"{len(margins)} --margin values for {len(names)} safety columns "
                         f"({', '.join(names)}): give one, or one per column", field="--margin")
    return margins


def _add_pipeline(sub, name: str, help: str, description: str):
    """`dualign mocan` / `dualign pecan`: the same flags machinery over their config class."""
    from .pipelines import config, pecan
    from .pipelines.stages import STAGES

    cls, stages = {"mocan": (config.MoCANConfig, STAGES), "pecan": (config.PeCANConfig, pecan.STAGES)}[name]
    p = sub.add_parser(name, help=help, description=description + " Settings come from --config FILE (YAML) "
                       "and flags, flags winning; each stage is cached in the run directory (--out) and a "
                       "rerun resumes.")
    p.add_argument("--config", metavar="FILE", help=f"YAML file of {cls.__name__} fields")
    p.add_argument("--from", dest="start", choices=stages, help="rerun from this stage on (ignore its cache)")
    p.add_argument("--until", dest="stop", choices=stages, help="stop after this stage")
    config.add_config_flags(p, cls)
    p.set_defaults(func=cmd_pipeline, allow_extra=True, config_class=cls)
    return p


def _add_mocan(sub):
    return _add_pipeline(sub, "mocan", "MoCAN: sample → score → dual → pairs → train once → evaluate → report",
                         "Model-based one-shot safety alignment (docs/design.md §4).")


def _add_pecan(sub):
    return _add_pipeline(sub, "pecan", "PeCAN: pre-align DPO_H/DPO_S → implicit scores → dual → pairs → "
                         "train once → evaluate → report",
                         "Preference-based one-shot safety alignment (docs/design.md §4): no reward or cost model, "
                         "only preference data.")


def cmd_pipeline(args) -> int:
    from .pipelines.config import load_config, overrides_from_args
    from .pipelines.mocan import run_mocan
    from .pipelines.pecan import run_pecan

    cls = args.config_class
    cfg = load_config(cls, args.config, overrides_from_args(args, args.extra, cls.NESTED))
    run = {"mocan": run_mocan, "pecan": run_pecan}[args.command](cfg, start=args.start, stop=args.stop)
    print(f"\nartifacts in {run}/")
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the main job on the embedded default (the README's first command)",
                       description="MoCAN on the embedded SmolLM2-135M-Instruct with reward and cost models "
                                   "trained on the built-in demo data (cached after the first run); with "
                                   "--method pecan, PeCAN from the demo preferences alone (the demo models "
                                   "only judge the result).")
    p.add_argument("--method", choices=("mocan", "pecan"), default="mocan",
                   help="mocan (default): with the demo reward and cost models; pecan: from the demo "
                        "preferences alone, with DPO_H and DPO_S as baselines")
    p.add_argument("--dual-only", action="store_true",
                   help="only the dual, on the bundled synthetic score file (needs no model)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: a fresh folder under runs/)")
    p.add_argument("--margin", type=float, default=None,
                   help="safety margin (default: 0.95 × the largest achievable gain; PeCAN 0.5 ×)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--retrain-scorers", action="store_true",
                   help="train the demo reward and cost heads (about 4 min) instead of using the shipped ones")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (train longer to get closer to π_λ*)")
    p.add_argument("--quick", action="store_true", help="shrink everything for a smoke run (about 5 minutes)")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    if args.dual_only:
        return _dual_demo(args)
    from .pipelines.demo import demo_config, pecan_demo_config
    from .pipelines.mocan import run_mocan
    from .pipelines.pecan import run_pecan
    from .runio import new_run_dir

    pecan = args.method == "pecan"
    if args.retrain_scorers:
        from .train.demo_scorers import demo_scorers

        demo_scorers(retrain=True)
    run = new_run_dir(args.out, ("pecan-" if pecan else "") + ("demo-quick" if args.quick else "demo"))
    make, go = (pecan_demo_config, run_pecan) if pecan else (demo_config, run_mocan)
    go(make(run, quick=args.quick, margin=args.margin, beta=args.beta, epochs=args.epochs))
    print(f"\nartifacts in {run}/: report.md, eval.json, dual.json, pairs.parquet, figures/, train/model/"
          + (", pre_align/{helpful,safety_harmless}/model/ (DPO_H, DPO_S)" if pecan else ""))
    return 0


def _dual_demo(args) -> int:
    import numpy as np

    from .data.scores import read_score_arrays
    from .pipelines.dual_stage import format_dual_summary, solve_dual_stage, write_dual_outputs
    from .dual import DualProblem
    from .runio import new_run_dir

    src = Path(__file__).parent / "data" / "demo" / "synthetic_scores.csv"
    run = new_run_dir(args.out, "dual-demo")
    print(f"dualign demo (dual only): SYNTHETIC scores from {src.name} (200 prompts x 16 samples,")
    print("  drawn by dualign.data.scores.synthetic_scores; no model involved)\n")
    scores = read_score_arrays(src)
    max_gain = DualProblem(scores.reward, scores.safety, args.beta).max_gain()
    margin = args.margin if args.margin is not None else float(np.round(0.5 * max_gain[0], 3))
    print(f"largest achievable safety gain on these samples: {max_gain[0]:.3f}; margin asked: {margin:g}\n")
    d = solve_dual_stage(scores, args.beta, [margin], n_boot=200 if args.quick else 1000,
                         inputs={"scores_file": src.name})
    print(format_dual_summary(d))
    written = write_dual_outputs(d, scores, run / "dual.json", run / "figures")
    print(f"\nartifacts in {run}/: " + ", ".join(str(p.relative_to(run)) for p in written))
    return 0


def _add_sweep(sub):
    from .pipelines import config

    p = sub.add_parser("sweep", help="the paper's table: MoCAN at several margins (or λ), predicted vs achieved",
                       description="One MoCAN training per margin on shared samples and scores; every model "
                                   "evaluated on the same held-out prompts. Writes sweep.json, sweep.md (the "
                                   "table: the dual's predicted gains and KL against the achieved ones with 95% "
                                   "CIs) and figures/frontier.png. Settings come from --config FILE (YAML) or "
                                   "--demo, and flags; a rerun resumes.")
    p.add_argument("--config", metavar="FILE", help="YAML file of MoCANConfig fields (without margins)")
    p.add_argument("--demo", action="store_true", help="the demo's settings on the embedded default, sized for "
                   "four points in about 18 minutes on 2 CPU cores (240 pairs, one epoch a point)")
    p.add_argument("--quick", action="store_true", help="with --demo: the quick demo's settings")
    p.add_argument("--margins", metavar="LIST", help="comma-separated fractions of the largest achievable "
                   "safety gain, e.g. 0.25,0.5,0.75,0.9 (with --absolute: margins in score units)")
    p.add_argument("--absolute", action="store_true", help="--margins are in score units, not fractions")
    p.add_argument("--lambdas", metavar="LIST", help="instead of margins: comma-separated multipliers λ")
    config.add_config_flags(p, config.MoCANConfig, exclude=("margins", "max_unsafe_rate", "margin_fraction"))
    p.set_defaults(func=cmd_sweep, allow_extra=True)
    return p


def cmd_sweep(args) -> int:
    import dataclasses

    from .errors import InputError
    from .pipelines.config import MoCANConfig, load_config, overrides_from_args
    from .pipelines.demo import sweep_demo_config
    from .pipelines.sweep import parse_points, run_sweep
    from .runio import new_run_dir

    if bool(args.margins) == bool(args.lambdas):
        raise InputError("give --margins or --lambdas (one of them)", field="--margins")
    if args.demo == bool(args.config):
        raise InputError("give --config FILE or --demo (one of them)", field="--config")
    kind = "lambda" if args.lambdas else ("margin" if args.absolute else "fraction")
    values = parse_points(args.lambdas or args.margins, kind)
    overrides = overrides_from_args(args, args.extra, MoCANConfig.NESTED)
    if args.demo:
        cfg = sweep_demo_config(new_run_dir(overrides.pop("out", None), "sweep-demo"), quick=args.quick)
        train = {**cfg.train, **overrides.pop("train", {})}
        cfg = dataclasses.replace(cfg, **overrides, train=train)
    else:
        cfg = load_config(MoCANConfig, args.config, overrides)
    run = run_sweep(cfg, kind, values)
    print(f"\nartifacts in {run}/: sweep.md, sweep.json, figures/frontier.png, points/*/ (one MoCAN run each)")
    return 0


def _add_compare(sub):
    from .pipelines import config
    from .pipelines.compare import METHODS, CompareConfig

    p = sub.add_parser("compare", help="MoCAN and its rivals (DPO_H, DPO_S, SafeDPO, SACPO, P-SACPO, primal–dual) "
                       "on the same data, judged the same way, with their compute",
                       description="Runs MoCAN and the chosen rivals over one or more seeds; every model is "
                                   "evaluated on the same held-out prompts with the same seeds (scores, KL, "
                                   "refusal and over-refusal). Writes compare.json, compare.md (one table with "
                                   "wall time, tokens and estimated FLOPs) and figures/compare.png. Settings "
                                   "come from --config FILE (YAML of CompareConfig fields) or --demo, and flags; "
                                   "a rerun resumes.")
    p.add_argument("--config", metavar="FILE", help="YAML file of CompareConfig fields (a MoCAN config plus "
                   f"methods: [{', '.join(METHODS)}], seeds, preferences, ...)")
    p.add_argument("--demo", action="store_true", help="the demo's settings on the embedded default, sized for "
                   "the 2-core CPU")
    p.add_argument("--quick", action="store_true", help="with --demo: a smoke run (minutes)")
    config.add_config_flags(p, CompareConfig)
    p.set_defaults(func=cmd_compare, allow_extra=True)
    return p


def cmd_compare(args) -> int:
    import dataclasses

    from .errors import InputError
    from .pipelines.compare import CompareConfig, run_compare
    from .pipelines.config import load_config, overrides_from_args
    from .pipelines.demo import compare_demo_config
    from .runio import new_run_dir

    if args.demo == bool(args.config):
        raise InputError("give --config FILE or --demo (one of them)", field="--config")
    overrides = overrides_from_args(args, args.extra, CompareConfig.NESTED)
    if args.demo:
        cfg = compare_demo_config(new_run_dir(overrides.pop("out", None), "compare-demo"), quick=args.quick)
        for k in list(overrides):  # `train.X`: one entry of a nested mapping
            head, dot, key = k.partition(".")
            if dot:
                getattr(cfg, head)[key] = overrides.pop(k)
        cfg = dataclasses.replace(cfg, **overrides)
    else:
        cfg = load_config(CompareConfig, args.config, overrides)
    run = run_compare(cfg)
    print(f"\nartifacts in {run}/: compare.md, compare.json, figures/compare.png, seed-*/ (MoCAN run and rivals)")
    return 0


def _add_sampling_args(p, *, num_samples: int, max_new_tokens: int) -> None:
    """The sampling flags `dualign sample` and `dualign evaluate` share, with each command's defaults."""
    p.add_argument("--num-samples", "-k", type=int, default=num_samples, metavar="K",
                   help=f"responses per prompt (default {num_samples})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="T",
                   help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call (default 16)")


def _add_sample(sub):
    from .models.loading import EMBEDDED_DEFAULT

    p = sub.add_parser("sample", help="sample K responses per prompt from a policy (samples.parquet)",
                       description="Batched, seeded, resumable sampling: writes RUN_DIR/samples.parquet "
                                   "(prompt_id, prompt, sample_id, response, n_tokens, seed, model).")
    p.add_argument("--model", default=EMBEDDED_DEFAULT,
                   help=f"HF id, local directory, .gguf file, or '{EMBEDDED_DEFAULT}' (default)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="JSONL/CSV/Parquet (see --column), .txt (one per line), or a HF dataset name")
    p.add_argument("--column", default="prompt", help="prompt column (default: prompt)")
    p.add_argument("--split", default="train", help="split, for a HF dataset (default: train)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    _add_sampling_args(p, num_samples=4, max_new_tokens=128)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--template", help="prompt template with {prompt} (default: chat template, else PKU)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)
    return p


def cmd_sample(args) -> int:
    from .models.generation import (SAMPLES_FILE, check_device, check_sampling_args, read_prompts, sample,
                                    sample_vllm)
    from .errors import InputError
    from .parallel import rank_device
    from .runio import check_output_dir, dist_info, run_lock, write_parquet

    # every setting checked before the model loads or anything is written under --out
    check_sampling_args(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        batch_size=args.batch_size)
    check_device(args.device)
    check_output_dir(args.out)
    launch = dist_info()
    if launch.world_size > 1 and args.backend == "vllm":
        raise InputError("the vllm backend is not sharded across processes: run it as one process "
                         "(vLLM spreads a model over GPUs itself)", field="--backend")
    device = rank_device(args.device, launch)  # each rank of a distributed launch takes its own GPU
    prompts = read_prompts(args.prompts, column=args.column, split=args.split, limit=args.limit)
    kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
              template=args.template)
    out = Path(args.out) / SAMPLES_FILE
    with run_lock(args.out):  # a second run into the same --out would mix its parts with ours
        if args.backend == "vllm":
            df = sample_vllm(args.model, prompts, dtype=args.dtype or "auto", **kw)
            write_parquet(df, out)
        else:
            from .models.loading import load_policy

            model, tok = load_policy(args.model, dtype=args.dtype, device=device)
            df = sample(model, tok, prompts, batch_size=args.batch_size, model_name=args.model,
                        out_dir=args.out, progress=not args.no_progress, **kw)
    if launch.rank == 0:  # one line per run, not one per rank
        print(f"wrote {out}: {len(prompts)} prompts x {args.num_samples} samples, "
              f"{int(df['n_tokens'].sum())} tokens, {int(df['truncated'].sum())} truncated")
    return 0


def _add_logprobs(sub):
    from .models.loading import EMBEDDED_DEFAULT
    from .train.preference_config import PreferenceConfig

    p = sub.add_parser("logprobs", help="add log π(response|prompt) under a model to scores.parquet",
                       description="Sequence log-probabilities of the samples under --model, written as "
                                   "column logp/NAME of scores.parquet (next to the samples by default). "
                                   "Made as the pipelines make theirs (same provenance): a column made here "
                                   "with the model, template, EOS and --max-length a pipeline uses (its "
                                   "training settings; e.g. PeCAN's logp/ref under --model its policy) is "
                                   "reused there, not computed again.")
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--samples", required=True, metavar="RUN_DIR/samples.parquet")
    p.add_argument("--name", required=True, help="column suffix: logp/NAME (e.g. ref)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", help="prompt template (default: the one the samples were drawn with)")
    p.add_argument("--max-length", type=int, default=PreferenceConfig.max_length, metavar="N",
                   help="cut prompt + response to N tokens, the response first (default "
                        f"{PreferenceConfig.max_length}, the training's default; 0: no cut)")
    p.add_argument("--no-eos", action="store_true",
                   help="do not count the EOS that ends each response (training's append_eos: false); "
                        "a response cut at max_new_tokens never counts one")
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--out", metavar="FILE", help="default: scores.parquet next to the samples")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_logprobs)
    return p


def cmd_logprobs(args) -> int:
    from .errors import InputError
    from .models.generation import check_device
    from .data.scores import read_samples
    from .pipelines.scoring import LogProbModel, logprob_columns
    from .runio import check_name, check_output_file, run_lock

    # every setting checked before the model loads; NAME (column logp/NAME) is a plain name
    check_name(args.name, "--name")
    if args.batch_size < 1:
        raise InputError(f"must be >= 1; got {args.batch_size}", field="--batch-size")
    if args.max_length < 0:
        raise InputError(f"must be >= 0 (0: no cut); got {args.max_length}", field="--max-length")
    check_device(args.device)
    out = Path(args.out) if args.out else Path(args.samples).parent / "scores.parquet"
    check_output_file(out)
    samples = read_samples(args.samples)  # a bad samples file is a one-line error, before any model loads
    template = args.template
    if template is None:
        template = (samples.attrs.get("dualign") or {}).get("template")

    def load():
        from .models.loading import load_policy
        from .parallel import rank_device

        # under a distributed launch each rank takes its own GPU and its shard of the batches
        return load_policy(args.model, dtype=args.dtype, device=rank_device(args.device))

    # the model's identity as the pipelines record a policy spec (PeCAN's logp/ref: the spec)
    with run_lock(out.parent):  # another run adding a column to the same file would lose one
        logprob_columns([args.samples], [LogProbModel(args.name, str(args.model), load)], template=template,
                        append_eos=not args.no_eos, max_length=args.max_length or None,
                        batch_size=args.batch_size, scores_paths=[out], progress=not args.no_progress)
    return 0


# the help of every flag that takes scorer specs says it (scorers.load_scorer)
_TRUST = ("a file.py:function spec imports and runs that file's code, as `python file.py` would; "
          "only use files you trust")


def _add_score(sub):
    p = sub.add_parser("score", help="score samples with reward and safety/cost models (scores.parquet)",
                       description="Writes scores.parquet: the samples' keys plus `reward` and "
                                   "`safety/NAME` (higher = safer; a cost model is negated, and must "
                                   "say so: NAME=cost:SPEC, or kind/score_type in its own config). "
                                   "Security: " + _TRUST + ".")
    p.add_argument("--samples", required=True, metavar="RUN_DIR/samples.parquet")
    p.add_argument("--reward", metavar="SPEC",
                   help="reward scorer: directory or HF id (sequence classifier, safe-rlhf LlamaForScore, "
                        "trained head), or module:function / file.py:function (" + _TRUST + ")")
    p.add_argument("--safety", action="append", default=[], metavar="NAME=SPEC",
                   help="safety constraint; SPEC prefixed by cost: (negated), harm: (a cost model counted only "
                        "above 0: -max(cost, 0)) or safety: (as is) unless its config declares the kind; "
                        "SPEC as for --reward (" + _TRUST + "); repeatable")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", help="prompt template for the score models")
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--out", metavar="FILE", help="default: scores.parquet next to the samples")
    p.set_defaults(func=cmd_score)
    return p


def cmd_score(args) -> int:
    from .pipelines.scoring import score_jobs, score_samples
    from .runio import check_output_file, dist_info, run_lock

    jobs = score_jobs(args.reward, args.safety)  # every sign checked before any model loads
    out = Path(args.out) if args.out else Path(args.samples).parent / "scores.parquet"
    check_output_file(out)
    with run_lock(out.parent):  # one run at a time writes scores.parquet and its parts there
        # under a distributed launch every rank scores its shard; rank 0 writes the file
        score_samples(args.samples, jobs, out, batch_size=args.batch_size, template=args.template,
                      dtype=args.dtype, device=args.device)
    if dist_info().rank == 0:
        print(f"wrote {out}")
    return 0


def _add_train_scorer(sub):
    p = sub.add_parser("train-scorer", help="train a reward or cost model (linear head on a frozen backbone)",
                       description="Reward: Bradley-Terry on better_response_id. Cost (Safe RLHF): pairwise "
                                   "on safer_response_id plus a sign term (cost > 0 = unsafe). Features are "
                                   "cached; prints held-out pairwise (and sign) accuracy.")
    p.add_argument("--kind", required=True, choices=("reward", "cost"))
    p.add_argument("--data", default="demo", metavar="FILE|demo",
                   help="preferences: PKU-SafeRLHF, TRL prompt/chosen/rejected or HH-RLHF transcripts "
                        "(.jsonl[.gz]/.csv/.parquet); 'demo' = the built-in train split (default)")
    p.add_argument("--test", metavar="FILE|demo",
                   help="held-out pairs; default: the demo test split for --data demo, else "
                        "--test-fraction of the prompts")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--schema", choices=("pku", "trl", "hh"), help="default: detected from the columns")
    p.add_argument("--limit", type=int, help="use only the first N records of --data")
    p.add_argument("--out", required=True, metavar="DIR", help="scorer directory to write")
    p.add_argument("--backbone", default="smollm2-135m-instruct",
                   help="causal LM spec (as for sample) or a sentence encoder: all-minilm-l6-v2, encoder:DIR")
    p.add_argument("--pooling", choices=("last", "mean"), default="mean",
                   help="mean (default) of the response tokens' last hidden states, or the last token's")
    p.add_argument("--template", default="auto",
                   help="prompt template with {prompt}; 'auto' (default): the backbone's scorer template "
                        "(SmolLM2: its chat format without the default system prompt), else its chat template")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--l2", type=float, help="L2 strength (default: chosen by 4-fold CV)")
    p.add_argument("--sign-weight", type=float, default=1.0, help="cost model's classification term weight")
    p.add_argument("--rank-both-safe", action="store_true",
                   help="cost: also rank pairs whose two answers are both safe by safer_response_id (Safe RLHF's "
                        "loss; default: such pairs feed only the sign term, so saying less is not learned as safer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: <dualign cache>/features)")
    p.set_defaults(func=cmd_train_scorer)
    return p


def cmd_train_scorer(args) -> int:
    from .data.demo_data import demo_path
    from .data.preferences import load_preferences
    from .runio import file_digest, write_json
    from .train.scorer import ScorerTrainConfig, train_scorer

    def load(spec, split, limit=None):
        path = demo_path(split) if spec == "demo" else spec  # "demo": the built-in split
        df = load_preferences(path, schema=args.schema, require_safety=(args.kind == "cost"), limit=limit)
        return df, {"path": str(path), "digest": file_digest(path)}

    train, src = load(args.data, "train", limit=args.limit)
    test, test_src = None, None
    if args.test or args.data == "demo":
        test, test_src = load(args.test or "demo", "test")
    cfg = ScorerTrainConfig(kind=args.kind, backbone=args.backbone, pooling=args.pooling,
                            template=args.template, max_length=args.max_length, l2=args.l2,
                            sign_weight=args.sign_weight, rank_both_safe=args.rank_both_safe,
                            test_fraction=args.test_fraction,
                            seed=args.seed, batch_size=args.batch_size)
    res = train_scorer(train, cfg, test_df=test, out_dir=args.out, cache_dir=args.cache_dir,
                       source={"train": src, **({"test": test_src} if test_src else {})})
    write_json(res.metrics, f"{args.out}/metrics.json")
    print(f"wrote {args.out}")
    return 0


def _add_evaluate(sub):
    from .models.loading import EMBEDDED_DEFAULT

    p = sub.add_parser("evaluate", help="behaviour: refusal of harmful prompts, over-refusal of benign ones "
                                        "(no score model)",
                       description="Sample a model and a baseline on prompt suites with the same settings and "
                                   "seeds, detect refusals, and report per suite the refusal rate (harmful "
                                   "suites) or over-refusal rate (benign, borderline) with 95% bootstrap CIs "
                                   "over prompts, and trained − baseline paired by prompt. Writes "
                                   "OUT/behaviour.json; samples are cached in OUT/<suite>/<model>/ and a rerun "
                                   "resumes.")
    p.add_argument("--model", required=True, metavar="M",
                   help="the model to judge: a dualign training output (train/ or train/model/, adapter or "
                        "merged), a local HF directory, a .gguf file or a HF id")
    p.add_argument("--baseline", default=EMBEDDED_DEFAULT, metavar="REF",
                   help=f"the reference it is compared with (default: {EMBEDDED_DEFAULT}); also the base of "
                        "an adapter --model")
    p.add_argument("--suite", action="append", default=[], metavar="NAME=KIND:FILE",
                   help="a prompt suite: KIND harmful (refusal wanted), benign or borderline (refusal is "
                        "over-refusal); FILE .txt (one prompt per line) or JSONL/CSV/Parquet with --column; "
                        "or a built-in name (harmful, benign, borderline); repeatable")
    p.add_argument("--builtin-suites", action="store_true",
                   help="add the built-in suites: harmful and benign (the demo prompts' eval split) and "
                        "borderline (held-out borderline-benign prompts)")
    p.add_argument("--column", default="prompt", help="prompt column of table suite files (default: prompt)")
    p.add_argument("--detector", default="phrases", metavar="SPEC",
                   help="refusal detector: phrases (default), hf-classifier:PATH_OR_ID[:LABEL] (a sequence "
                        "classifier, LABEL the refusal label's index or name) or guard:PATH_OR_ID (a "
                        "generative guard through its chat template)")
    _add_sampling_args(p, num_samples=2, max_new_tokens=48)
    p.add_argument("--limit", type=int, metavar="N", help="only the first N prompts of each suite")
    p.add_argument("--out", required=True, metavar="DIR")
    # -- pairwise LLM judge (dualign.eval.judge), optional; kept apart from the refusal detector
    p.add_argument("--judge-base-url", metavar="URL",
                   help="also judge model vs baseline pairwise (helpfulness, harmlessness; both orders) with an "
                        "OpenAI-compatible endpoint (needs --judge-model; pip install 'dualign[judge]')")
    p.add_argument("--judge-model", metavar="NAME", help="the judge model's name at the endpoint")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the judge's API key (default OPENAI_API_KEY; a local "
                        "endpoint needs none)")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_evaluate(args) -> int:
    from .errors import InputError
    from .eval.behaviour import BUILTIN_SUITES, load_detector, parse_suite_specs
    from .runio import run_lock

    # every input is checked before any model loads
    specs = list(args.suite) + [b for b in BUILTIN_SUITES if args.builtin_suites and b not in args.suite]
    if not specs:
        raise InputError("no suite: give --suite NAME=KIND:FILE (repeatable) and/or --builtin-suites",
                         field="--suite")
    for name, v, low in (("--num-samples", args.num_samples, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                         ("--batch-size", args.batch_size, 1), ("--seed", args.seed, 0),
                         ("--limit", args.limit if args.limit is not None else 1, 1)):
        if v < low:
            raise InputError(f"must be >= {low}, got {v}", field=name)
    suites = parse_suite_specs(specs, args.column)
    detector = load_detector(args.detector)
    judge = _judge_config(args)
    for spec in (args.model, args.baseline):
        _check_model_spec(spec)
    with run_lock(args.out):  # a second evaluation into the same folder is refused, not mixed in
        return _evaluate(args, suites, detector, judge)


def _evaluate(args, suites, detector, judge) -> int:
    from types import SimpleNamespace

    from .eval.behaviour import (REFERENCE, TRAINED, behaviour_from_samples, format_behaviour_table,
                                 load_model_for_eval, sample_suites)
    from .pipelines.stages import model_ident
    from .runio import write_json

    out = Path(args.out)
    gen = SimpleNamespace(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, sample_batch_size=args.batch_size)
    specs_of = {REFERENCE: args.baseline, TRAINED: args.model}
    paths = {}
    for key, spec in specs_of.items():
        print(f"sampling {key} ({spec}) on {len(suites)} suite(s) × {args.num_samples} samples per prompt")
        model, tok = load_model_for_eval(spec, args.baseline)
        done = sample_suites(out, model, tok, suites, gen, model_key=key, model_name=model_ident(spec),
                             num_samples=args.num_samples, limit=args.limit)
        paths.update({(suite, key): p for suite, p in done.items()})
        del model
    behaviour = behaviour_from_samples(paths, {s.name: s.kind for s in suites}, detector, seed=args.seed)
    record = {**behaviour, "model_specs": specs_of,
              "suite_sources": {s.name: s.source for s in suites},
              "generation": {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                             "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}}
    if judge is not None:
        record["judge"] = _judge_suites(paths, suites, judge, args.seed)
    write_json(record, out / "behaviour.json")
    print(format_behaviour_table(behaviour))
    for suite, res in record.get("judge", {}).items():
        print(f"judge ({args.judge_model}), {suite}: " + "; ".join(
            f"{c} win {r['win_rate']:.0%} tie {r['tie_rate']:.0%} loss {r['loss_rate']:.0%} ({r['n_scored']} prompts)"
            if r["win_rate"] is not None else f"{c}: no prompt scored" for c, r in res.items()))
    print(f"wrote {out / 'behaviour.json'}")
    return 0


def _check_model_spec(spec: str) -> None:
    """InputError now, not after minutes of sampling, for a model path that does not exist."""
    from .models.loading import resolve_spec

    if not Path(spec).is_dir():
        resolve_spec(spec)


# ----------------------------------------------------------------------------- evaluate: pairwise judge
# Apart from the refusal detector: the judge (dualign.eval.judge) compares the two models' first
# samples on each suite, helpfulness and harmlessness, in both orders.

def _judge_config(args):
    """The JudgeConfig of `--judge-*`, or None without them.

    Raises
    ------
    InputError
        A judge flag without --judge-model, or a bad value (JudgeConfig's checks)."""
    from .errors import InputError

    if args.judge_model is None:
        if args.judge_base_url is not None:
            raise InputError("--judge-base-url needs --judge-model (the judge model's name)", field="--judge-model")
        return None
    from .eval.judge import JudgeConfig

    kw = {"base_url": args.judge_base_url} if args.judge_base_url else {}
    return JudgeConfig(model=args.judge_model, api_key_env=args.judge_api_key_env, **kw)


def _add_convert(sub):
    p = sub.add_parser("convert", help="rewrite a checkpoint's weights as safetensors (e.g. the paper's .bin models)",
                       description="Copy a checkpoint directory (config, tokenizer, generation config, model "
                                   "card) into DST_DIR with its weights rewritten as safetensors. A .bin is "
                                   "read only through torch's restricted unpickler (weights_only=True): one "
                                   "that needs full unpickling is refused. DST_DIR appears only when complete.")
    p.add_argument("src", metavar="SRC_DIR", help="checkpoint directory (config.json + weights)")
    p.add_argument("--out", required=True, metavar="DST_DIR", help="new directory (must not exist, or be empty)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB (10^9 bytes), 2GiB, 500MB (default 5GB)")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args) -> int:
    from .models.checkpoints import convert_checkpoint

    r = convert_checkpoint(args.src, args.out, max_shard_size=args.max_shard_size)
    files = r["weights"] + ([r["index"]] if r["index"] else [])
    size = f"{r['bytes'] / 1e9:.3g} GB" if r["bytes"] >= 1e8 else f"{r['bytes'] / 1e6:.3g} MB"
    print(f"wrote {r['out']}: {r['tensors']} tensors, {size}, from {len(r['sources'])} "
          f"{r['format']} file(s) into {', '.join(files)}")
    if r["cloned"]:
        print(f"cloned {len(r['cloned'])} tensor(s) that shared storage (tied weights): {', '.join(r['cloned'][:4])}"
              + (", ..." if len(r["cloned"]) > 4 else ""))
    print(f"copied: {', '.join(r['copied']) or 'nothing'}")
    if r["skipped"]:
        print(f"not copied: {', '.join(r['skipped'])}")
    return 0


def _judge_suites(paths: dict, suites, config, seed: int) -> dict:
    """suite → criterion → JudgeResult JSON: the model (A) against the baseline (B), sample 0 of
    each prompt."""
    import pandas as pd

    from .eval.behaviour import REFERENCE, TRAINED
    from .eval.judge import judge_pairwise

    out = {}
    for s in suites:
        a, b = (pd.read_parquet(paths[(s.name, m)]).query("sample_id == 0").sort_values("prompt_id")
                for m in (TRAINED, REFERENCE))
        res = judge_pairwise(a["prompt"].tolist(), a["response"].tolist(), b["response"].tolist(), config, seed=seed)
        out[s.name] = {c: r.to_json() for c, r in res.items()}
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualign", description="One-shot safety alignment of language models via optimal dualization "
                                    "(CAN: MoCAN and PeCAN). Run `dualign COMMAND --help` for a command's flags.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dualign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_dual, _add_demo, _add_mocan, _add_pecan, _add_sweep, _add_compare, _add_sample, _add_logprobs,
                _add_score, _add_train_scorer, _add_evaluate):
        add(sub)
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except DualignError as e:
        # one line, whatever the message holds
        print(f"dualign {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (a full disk, a permission) where no check could look ahead
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"dualign {args.command}: error: {where}{e.strerror or ' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dualign {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
