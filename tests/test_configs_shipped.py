"""The config files shipped in configs/ run as they are: no model is loaded, nothing is launched.

- Every pipeline YAML (configs/*.yaml) goes through what `dualign mocan|pecan --config FILE`
  does before its first stage (the CLI's own parser, `load_config`, `validate`, the scorer
  signs), for every command line its header comment gives; a misspelled key fails.
- Every accelerate YAML (configs/accelerate/*.yaml) goes through what `accelerate launch
  --config_file FILE` does with it in the installed accelerate: its own loader (unknown
  top-level keys raise there), its merge of the file into the launch options (where an unknown
  key inside `fsdp_config` / `deepspeed_config`, or a top-level key whose option has a default,
  would be dropped silently: checked here), the environment it hands the ranks, and the
  FSDP / DeepSpeed plugin the Trainer's Accelerator builds from that environment. The
  multi-machine flags of each header comment go through the same path.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dualign.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PIPELINE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))

# a command line in a header comment: `dualign mocan ...`, or a launcher running `-m dualign.cli mocan ...`
PIPELINE_COMMAND = re.compile(
    r"\b(?:(?:accelerate launch|torchrun)\s.*?-m dualign\.cli|dualign)\s+(?:mocan|pecan)\s.*$")
ACCELERATE_COMMAND = re.compile(r"\baccelerate launch\s.*$")

# launch options read from the config file by name rather than through the "option left at
# None" rule of accelerate's `_validate_launch_command`
READ_SPECIALLY = {"compute_environment", "distributed_type", "mixed_precision", "debug"}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _comment_lines(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def _pipeline_commands(path: Path) -> list[list[str]]:
    """The `dualign mocan|pecan ...` arguments of every command line in `path`'s comments, with
    the launcher (accelerate launch / torchrun ... -m dualign.cli) cut off."""
    out = []
    for line in _comment_lines(path):
        m = PIPELINE_COMMAND.search(line)
        if m:
            argv = shlex.split(m.group(0))
            start = argv.index("dualign.cli") + 1 if "dualign.cli" in argv else argv.index("dualign") + 1
            out.append(argv[start:])
    return out


def load_like_the_cli(argv: list[str]):
    """What `dualign mocan|pecan` (cli.cmd_pipeline) does with `argv` before its first stage: the
    CLI parser, the config file with the flags over it, `validate`, and the scorer signs
    (`score_jobs`, as run_mocan / run_pecan check them before any model loads).

    Raises
    ------
    InputError
        Whatever the CLI would report with exit code 2 (unknown setting, bad value, ...).
    """
    from dualign.cli import build_parser
    from dualign.pipelines.config import load_config, overrides_from_args
    from dualign.pipelines.scoring import score_jobs

    args, extra = build_parser().parse_known_args(argv)
    cls = args.config_class
    cfg = load_config(cls, args.config, overrides_from_args(args, extra, cls.NESTED)).validate()
    if cfg.reward or cfg.safety:
        score_jobs(cfg.reward, cfg.safety)
    return cfg


# ----------------------------------------------------------------------------- pipeline configs

def test_the_shipped_files_are_there():
    names = {p.name for p in PIPELINE_CONFIGS}
    assert {"mocan-beaver-7b.yaml", "mocan-beaver-7b-8gpu.yaml", "pecan-alpaca-7b.yaml"} <= names
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_config_loads_as_its_header_runs_it(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the header's lines run from the repository root
    commands = _pipeline_commands(path)
    assert commands, f"{_rel(path)}: no `dualign mocan|pecan --config ...` line in its header comment"
    for argv in commands:
        assert argv[argv.index("--config") + 1] == _rel(path), f"{_rel(path)}: a header line runs another file: {argv}"
        load_like_the_cli(argv)


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_config_launch_lines_name_shipped_accelerate_files(path):
    for line in _comment_lines(path):
        m = ACCELERATE_COMMAND.search(line)
        if m:
            argv = shlex.split(m.group(0))
            assert (REPO / argv[argv.index("--config_file") + 1]).is_file(), line


def test_8gpu_config_is_the_one_gpu_run_with_its_batch_split_over_8_gpus():
    """Only what 8 GPUs change differs: the training batch per device (the global batch stays),
    nothing else; the sampling batch plan, hence samples.parquet, is the one-GPU config's."""
    one = yaml.safe_load((CONFIGS / "mocan-beaver-7b.yaml").read_text())
    eight = yaml.safe_load((CONFIGS / "mocan-beaver-7b-8gpu.yaml").read_text())
    t1, t8 = one.pop("train"), eight.pop("train")
    assert one == eight
    global_batch = {k: t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * n
                    for k, t, n in (("one", t1, 1), ("eight", t8, 8))}
    assert global_batch["one"] == global_batch["eight"]
    rest = ("per_device_train_batch_size", "gradient_accumulation_steps")
    assert {k: v for k, v in t1.items() if k not in rest} == {k: v for k, v in t8.items() if k not in rest}


@pytest.mark.parametrize("edit", [("sample_batch_size:", "sample_batchsize:"),
                                  ("per_device_train_batch_size:", "per_device_batch_size:"),
                                  ("harm: 2.0", "harms: 2.0")],
                         ids=["top-level key", "train key", "margin of no constraint"])
def test_a_misspelled_pipeline_setting_fails(edit, tmp_path, monkeypatch):
    """The check above can fail: the 8-GPU config with one key misspelled is refused."""
    text = (CONFIGS / "mocan-beaver-7b-8gpu.yaml").read_text()
    assert text.count(edit[0]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(*edit))
    monkeypatch.chdir(REPO)
    with pytest.raises(InputError):
        load_like_the_cli(["mocan", "--config", str(bad)])


# ----------------------------------------------------------------------------- accelerate configs

def _launch_option_defaults() -> dict:
    """`accelerate launch` option name (argparse dest) → its default, from accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    return {a.dest: a.default for a in launch_command_parser()._actions}


def _launch_name(section: str, key: str) -> str:
    """The launch option a key of a config section sets (as `_validate_launch_command` maps it)."""
    kept, prefix = {"fsdp_config": ("fsdp", "fsdp_"), "fp8_config": ("fp8", "fp8_"),
                    "dynamo_config": ("dynamo_", "dynamo_")}.get(section, ("", ""))
    return key if key.startswith(kept) else prefix + key


def check_keys(path: Path) -> None:
    """Every key of the accelerate config `path` is one `accelerate launch` uses.

    accelerate's loader refuses unknown top-level keys itself (tested through
    `launch_environment`); what it lets through silently is checked here: a key inside a section
    (`fsdp_config`, `deepspeed_config`, ...) becomes the launch option of that name whatever it
    is, so one that is no option is dropped; and a top-level key is taken only when its option
    defaults to None (`same_network: true`, say, is not: that option defaults to False).

    Raises
    ------
    AssertionError
        Naming the file and the key.
    """
    from accelerate.commands.config.config_args import ClusterConfig

    options = _launch_option_defaults()
    data = yaml.safe_load(path.read_text())
    for name, value in data.items():
        if isinstance(value, dict):
            for key in value:
                assert _launch_name(name, key) in options, \
                    f"{_rel(path)}: {name}.{key} is no `accelerate launch` option"
        else:
            assert name in ClusterConfig.__dataclass_fields__, f"{_rel(path)}: unknown key {name}"
            assert name in READ_SPECIALLY or (name in options and options[name] is None), \
                (f"{_rel(path)}: `accelerate launch` ignores {name} from a config file (its option "
                 f"defaults to {options.get(name)!r})")


def launch_environment(path: Path, monkeypatch, flags: tuple[str, ...] = ()):
    """Do what `accelerate launch [flags] --config_file path -m dualign.cli ...` does up to
    starting the ranks, and set the environment it gives them.

    Returns
    -------
    (args, cmd)
        The launch options after the file was merged in (nproc_per_node, nnodes, ...), and the
        command DeepSpeed's multi-node launcher would run (None: torchrun's own).
    """
    from accelerate.commands.launch import launch_command_parser
    # `accelerate launch` merges the file into its options here; no public function does that
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = [*flags, "--config_file", str(path), "-m", "dualign.cli", "mocan"]
    args, defaults, mp_from_file = _validate_launch_command(launch_command_parser().parse_args(argv))
    cmd = None
    if args.use_deepspeed:
        # as accelerate's launch_command does before it calls the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_file else []))
        cmd, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return args, cmd


KINDS = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_what_accelerate_launch_reads(path, monkeypatch, tiny_model):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    check_keys(path)
    cfg = load_config_from_file(str(path))  # `accelerate launch`'s loader: unknown keys raise
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == KINDS[path.stem]
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (8, 1, "bf16")

    args, cmd = launch_environment(path, monkeypatch)
    assert args.nproc_per_node == "8" and cmd is None
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if path.stem == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the environment, as the Trainer's Accelerator builds it
        assert plugin.fsdp_version == 2
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        plugin.set_auto_wrap_policy(tiny_model)  # the class is found in a real Llama (raises if not)
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
        # the configs train with gradient checkpointing; the Trainer refuses both; π_ref is loaded by
        # dualign on every rank, before the Trainer: no broadcast into empty weights
        assert plugin.activation_checkpointing is False and plugin.cpu_ram_efficient_loading is False
    elif path.stem.startswith("deepspeed"):
        from accelerate.utils import DeepSpeedPlugin

        ds = DeepSpeedPlugin().deepspeed_config
        stage = int(path.stem[-1])
        assert ds["zero_optimization"]["stage"] == stage
        # the Trainer fills these from the config's `train:` section
        assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
        assert ds["train_micro_batch_size_per_gpu"] == "auto"
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_header_lines_run(path, monkeypatch):
    """The one-machine line runs this file; the multi-machine flags start 8 ranks on machine R of
    2, meeting at MAIN_IP, each machine starting its own (no pdsh/ssh for DeepSpeed)."""
    lines = _comment_lines(path)
    launch = [shlex.split(m.group(0)) for m in map(ACCELERATE_COMMAND.search, lines) if m]
    assert launch, f"{_rel(path)}: no `accelerate launch` line in its header comment"
    for argv in launch:
        assert argv[argv.index("--config_file") + 1] == _rel(path)
    flags = [line for line in lines if line.startswith("--num_machines")]
    assert len(flags) == 1, f"{_rel(path)}: expected one line of multi-machine flags"
    argv = shlex.split(flags[0].replace("MAIN_IP", "10.1.2.3").replace("--machine_rank R", "--machine_rank 1"))
    args, cmd = launch_environment(path, monkeypatch, tuple(argv))
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    assert cmd is None
    assert "10.1.2.3" in (getattr(args, "rdzv_endpoint", "") or getattr(args, "master_addr", ""))


def _misspell(path: Path) -> list[tuple[str, str]]:
    """(description, YAML text) of `path` with one key misspelled: the first key of each section
    and the top-level `num_processes`, plus a key the launcher would ignore."""
    text = path.read_text()
    out = [("top-level key", text.replace("\nnum_processes:", "\nnum_process:", 1)),
           ("ignored top-level key", text + "same_network: true\n")]
    data = yaml.safe_load(text)
    for section, value in data.items():
        if isinstance(value, dict) and value:
            key = next(iter(value))
            out.append((f"{section}.{key}", text.replace(f"  {key}:", f"  {key}s:", 1)))
    return out


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_a_misspelled_accelerate_key_fails(path, tmp_path, monkeypatch):
    """The checks above can fail: each file with one key misspelled is refused by accelerate's
    loader or by `check_keys`."""
    for what, text in _misspell(path):
        assert text != path.read_text(), what
        bad = tmp_path / path.name
        bad.write_text(text)
        with pytest.raises((ValueError, AssertionError)):
            check_keys(bad)
            launch_environment(bad, monkeypatch)
