"""The demo's reward and cost heads (`dualign demo`): shipped in the package next to the demo
data (`dualign/data/demo/demo_scorer_{reward,cost}.*`, manifest `demo_scorers.json`), installed
into the cache when their key matches the data, and trained (`dualign.train.scorer.train_scorer`)
when it does not or when asked (`--retrain-scorers`, `python dualign/data/demo/build.py --scorers`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .scorer import DEFAULT_BACKBONE, DEFAULT_POOLING, ScorerTrainConfig, train_scorer

DEMO_VERSION = 2  # 2: pairs of two safe answers no longer ranked by the cost model


SHIPPED_DEMO_SCORERS = "demo_scorers.json"  # manifest of the heads shipped next to the demo data


def _demo_data_digests() -> dict:
    """The demo data files' digests, as the heads record them (`source`)."""
    from ..data.demo_data import demo_path
    from ..runio import file_digest

    return {"data": "dualign demo", "train_digest": file_digest(demo_path("train")),
            "test_digest": file_digest(demo_path("test"))}


def demo_scorers_key(source: dict | None = None) -> str:
    """sha256 hex digest naming the demo scorers: the demo data files (`source`, default
    `_demo_data_digests()`), the backbone, the pooling and `DEMO_VERSION` (bumped when the
    training of the heads changes). The cache folder is `demo-<first 12 hex digits>`; the
    shipped heads carry the full digest."""
    from ..runio import digest

    source = source or _demo_data_digests()
    return digest([DEMO_VERSION, DEFAULT_BACKBONE, DEFAULT_POOLING, source["train_digest"], source["test_digest"]],
                  length=64)


def demo_scorers(cache_dir=None, *, retrain: bool = False, log=print) -> tuple[Path, Path]:
    """Reward and cost scorers of the built-in demo data (cached).

    The package ships both heads (linear heads on the embedded SmolLM2's mean-pooled features,
    14 KB; `ship_demo_scorers` made them from this very function with `retrain=True`). The
    first call copies them into `<cache>/scorers/demo-<digest>/{reward,cost}` when their
    recorded digest (`demo_scorers_key`) matches the demo data and every file's digest checks
    out; otherwise, or with `retrain`, it trains both heads on the embedded backbone (about 4
    minutes on 2 CPU cores, mostly feature extraction). Later calls return the directories
    at once.

    Parameters
    ----------
    cache_dir : path, optional
        Cache root; default `$DUALIGN_CACHE`, else `~/.cache/dualign`.
    retrain : bool
        Train both heads even when cached or shipped (and overwrite the cached ones).
    log : callable

    Returns
    -------
    (reward_dir, cost_dir) : (pathlib.Path, pathlib.Path)
        Directories readable by `HeadScorer.load` and `dualign.models.scorers.load_scorer`.

    Raises
    ------
    InputError
        Training is needed and the embedded model is not installed (the message gives the
        install command).
    """
    from ..data.demo_data import demo_preferences
    from ..models.head_scorer import CONFIG_FILE
    from ..models.loading import cache_dir as default_cache

    root = Path(cache_dir) if cache_dir is not None else default_cache()
    source = _demo_data_digests()
    key = demo_scorers_key(source)
    base = root / "scorers" / f"demo-{key[:12]}"
    dirs = {k: base / k for k in ("reward", "cost")}
    if not retrain and (all((d / CONFIG_FILE).exists() for d in dirs.values())
                        or _install_shipped_demo_scorers(key, dirs, log)):
        return dirs["reward"], dirs["cost"]
    train, test = demo_preferences("train"), demo_preferences("test")
    loaded = None
    for kind in ("reward", "cost"):
        if not retrain and (dirs[kind] / CONFIG_FILE).exists():
            continue
        res = train_scorer(train, ScorerTrainConfig(kind=kind), test_df=test, out_dir=dirs[kind],
                           cache_dir=root / "features", loaded=loaded, log=log, source=source)
        loaded = getattr(res.scorer, "_loaded", None)
    return dirs["reward"], dirs["cost"]


def _shipped_file(kind: str, name: str) -> Path:
    """Where the package keeps a shipped demo head's file (flat: the package data is one folder)."""
    from ..data.demo_data import demo_dir
    from ..models.head_scorer import CONFIG_FILE

    return demo_dir() / f"demo_scorer_{kind}{'.json' if name == CONFIG_FILE else '.safetensors'}"


def _copy_into_place(src: Path, dst: Path) -> None:
    """Copy a file so that `dst` appears only complete (renamed into place)."""
    import shutil

    from ..runio import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _install_shipped_demo_scorers(key: str, dirs: dict, log) -> bool:
    """Copy the shipped heads into `dirs` (each file renamed into place, the config last) when
    the manifest names `key` and every file's digest matches; False (nothing written) when
    there is no manifest, it is for other demo data, or a file differs."""

    from ..data.demo_data import demo_dir
    from ..models.head_scorer import CONFIG_FILE, WEIGHTS_FILE
    from ..runio import file_digest

    manifest = demo_dir() / SHIPPED_DEMO_SCORERS
    if not manifest.exists():
        return False
    shipped = json.loads(manifest.read_text())
    if shipped.get("key") != key:
        log("demo scorers: the shipped heads were made for other demo data; training them")
        return False
    names = (WEIGHTS_FILE, CONFIG_FILE)  # the config marks a scorer directory complete: last
    for kind in dirs:
        for name in names:
            src = _shipped_file(kind, name)
            if not src.exists() or file_digest(src) != shipped["files"].get(f"{kind}/{name}"):
                log(f"demo scorers: shipped {src.name} is missing or altered; training them")
                return False
    for kind, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            _copy_into_place(_shipped_file(kind, name), d / name)
    log(f"demo scorers: the shipped heads ({shipped.get('made_by', 'ship_demo_scorers')}), "
        f"held-out pairwise accuracy reward {shipped.get('test_accuracy', {}).get('reward', float('nan')):.3f}, "
        f"cost {shipped.get('test_accuracy', {}).get('cost', float('nan')):.3f}")
    return True


def ship_demo_scorers(cache_dir=None, *, retrain: bool = True, log=print) -> Path:
    """Train both demo heads afresh (`demo_scorers(retrain=True)`; with `retrain=False`, take
    the cached ones) and write them, with a manifest of their digests, next to the demo data
    for the package to ship (`python dualign/data/demo/build.py --scorers`). Returns the
    manifest's path."""

    from ..data.demo_data import demo_dir
    from ..models.head_scorer import CONFIG_FILE, WEIGHTS_FILE
    from ..runio import file_digest, write_json

    dirs = dict(zip(("reward", "cost"), demo_scorers(cache_dir, retrain=retrain, log=log)))
    files, accuracy = {}, {}
    for kind, d in dirs.items():
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            _copy_into_place(d / name, _shipped_file(kind, name))
            files[f"{kind}/{name}"] = file_digest(_shipped_file(kind, name))
        accuracy[kind] = json.loads((d / CONFIG_FILE).read_text())["metrics"]["test"]["pairwise_accuracy"]
    manifest = demo_dir() / SHIPPED_DEMO_SCORERS
    write_json({"key": demo_scorers_key(), "made_by": "python dualign/data/demo/build.py --scorers",
                "backbone": DEFAULT_BACKBONE, "files": files, "test_accuracy": accuracy}, manifest)
    return manifest
