"""stacker's command line: parse the config and flags, call one stage, turn errors into exit codes.

    stacker train-base  --config run.yaml     folds, image cache, one job per (model, fold)
    stacker predict-oof --run DIR             TTA predictions: OOF and test tables
    stacker fit-stack   --run DIR             guarded meta level: stack/decision.json
    stacker submit      --run DIR             submission.csv in sample_submission's layout
    stacker demo        [--out DIR]           all four on the bundled digits dataset

The stages that need torch import it inside their handler: fit-stack and submit
run in a process that never imports torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from oof import RunPaths, StackerError, build_config, write_json, write_text

SECTIONS = ("run_dir", "data", "folds", "train", "models", "tta", "stack")
# Named flags and the config key each one overrides; their argparse default is
# "not given", so every default lives in the config dataclasses alone.
FLAG_KEYS = {
    "run": "run_dir", "data_root": "data.root", "epochs": "train.epochs", "device": "train.device",
    "k": "folds.k", "tta_n": "tta.n", "metric": "stack.metric", "test_features": "stack.test_features",
    "allow_suspicious": "stack.allow_suspicious",
}


# ---------------------------------------------------------------- config


def load_config(args) -> dict:
    """The raw config: --config (else <run>/run.yaml), then named flags, then --set KEY=VALUE."""
    cfg = {}
    source = args.config or (Path(args.run) / "run.yaml" if getattr(args, "run", None) else None)
    if source is not None and (args.config or Path(source).is_file()):
        cfg = _read_yaml(Path(source))
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            _override(cfg, key, value)
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise StackerError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        _override(cfg, key.strip(), yaml.safe_load(text))
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise StackerError(f"config: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise StackerError(f"{path}: config file not found")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise StackerError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise StackerError(f"{path}: the config must be a mapping of sections")
    return cfg


def _override(cfg: dict, dotted: str, value) -> None:
    """Set a key from the command line. A `train.*` key also beats every model entry's own value:
    run.yaml stores each model's resolved train keys, and a flag must still win over them."""
    _set_key(cfg, dotted, value)
    section, _, rest = dotted.partition(".")
    if section == "train" and rest and isinstance(cfg.get("models"), list):
        for entry in cfg["models"]:
            if isinstance(entry, dict):
                _set_key(entry, rest, value)


def _set_key(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise StackerError(f"--set {dotted}: {p!r} is not a section")
    node[last] = value


def run_paths(cfg: dict) -> RunPaths:
    if not cfg.get("run_dir"):
        raise StackerError("no run directory: pass --run DIR or set run_dir in the config")
    return RunPaths(Path(cfg["run_dir"]).resolve())


def _plain(obj):
    """Dataclass values as YAML-safe plain types (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def base_configs(cfg: dict):
    """data, folds, models and tta sections as dataclasses (imports torch)."""
    from base_models.config import FoldsConfig, TTAConfig, model_specs
    from base_models.dataset import DataConfig

    data = _section(cfg, "data")
    if "root" in data:
        data["root"] = str(Path(data["root"]).resolve())
    return (build_config(DataConfig, data, "data"), build_config(FoldsConfig, cfg.get("folds"), "folds"),
            model_specs(cfg.get("models"), _section(cfg, "train")),
            build_config(TTAConfig, cfg.get("tta"), "tta"))


def _section(cfg: dict, name: str) -> dict:
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise StackerError(f"{name}: must be a mapping of keys to values, got {value!r}")
    return dict(value)


def stack_config(cfg: dict):
    from stacker import StackConfig

    return build_config(StackConfig, cfg.get("stack"), "stack")


def save_run_config(paths: RunPaths, data, folds, specs, tta, stack_section) -> None:
    """Write the resolved config as <run>/run.yaml; models already in the run are kept."""
    previous = _read_yaml(paths.config).get("models") if paths.config.is_file() else None
    models = {m["name"]: m for m in previous or [] if isinstance(m, dict) and "name" in m}
    for s in specs:
        models[s.name] = {"name": s.name, "arch": s.arch, "pretrained": s.pretrained,
                          "model_kwargs": s.model_kwargs, **_plain(asdict(s.train))}
    resolved = {"run_dir": str(paths.root), "data": _plain(asdict(data)), "folds": asdict(folds),
                "models": list(models.values()), "tta": _plain(asdict(tta)), "stack": stack_section or {}}
    write_text(paths.config, yaml.safe_dump(resolved, sort_keys=False))


# ---------------------------------------------------------------- stages


def cmd_train_base(args, log=print) -> int:
    from base_models.jobs import cache_size, prepare_run, train_base

    cfg = load_config(args)
    paths = run_paths(cfg)
    data, folds_cfg, specs, tta = base_configs(cfg)
    _, folds = prepare_run(paths, data, folds_cfg, cache_size(specs), args.force, log)
    save_run_config(paths, data, folds_cfg, specs, tta, cfg.get("stack"))
    train_base(paths, specs, folds, data.extra_targets, args.force, args.parallel, log)
    return 0


def cmd_predict_oof(args, log=print) -> int:
    from base_models.jobs import predict_oof
    from oof import load_folds

    cfg = load_config(args)
    paths = run_paths(cfg)
    data, _, specs, tta = base_configs(cfg)
    if args.models:
        specs = [s for s in specs if s.name in args.models]
    predict_oof(paths, specs, load_folds(paths.folds), tta, data.extra_targets, args.force, log)
    return 0


def cmd_fit_stack(args, log=print) -> int:
    from stacker import fit_stack

    cfg = load_config(args)
    fit_stack(run_paths(cfg).root, stack_config(cfg), models=args.models, force=args.force, log=log)
    return 0


def cmd_submit(args, log=print) -> int:
    from stacker import write_submission

    cfg = load_config(args)
    paths = run_paths(cfg)
    sample = args.sample_submission
    if sample is None:
        data = cfg.get("data") or {}
        if not data.get("root"):
            raise StackerError("submit: pass --sample-submission (the run's config names no dataset)")
        sample = Path(data["root"]) / data.get("sample_submission", "sample_submission.csv")
    write_submission(paths.root, sample, args.out, source=args.source, force=args.force, log=log)
    return 0


def cmd_demo(args, log=print) -> int:
    from base_models.demo_data import write_digits_dataset

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    data_dir = write_digits_dataset(out / "data")
    config = out / "demo.yaml"
    write_text(config, yaml.safe_dump(demo_config(out), sort_keys=False))
    log(f"demo: dataset in {data_dir}, config {config}")
    stage_args = argparse.Namespace(config=str(config), run=None, set=None, force=args.force, parallel=1,
                                    models=None, sample_submission=None, out=None, source=None)
    for name, stage in (("train-base", cmd_train_base), ("predict-oof", cmd_predict_oof),
                        ("fit-stack", cmd_fit_stack), ("submit", cmd_submit)):
        log(f"\n== stacker {name} --config {config}")
        stage(stage_args, log)
    accuracy, seconds = demo_test_accuracy(out), time.perf_counter() - t0
    write_json(out / "demo_result.json", {"test_accuracy": accuracy, "seconds": seconds,
                                          "submission": str(out / "run" / "submission.csv")})
    log(f"\ndemo: test accuracy of {out / 'run' / 'submission.csv'} against the kept labels: {accuracy:.4f} "
        f"({seconds:.0f}s in all; saved in {out / 'demo_result.json'})")
    return 0


def demo_config(out: Path) -> dict:
    """The demo's run: three tiny timm architectures, 5 folds, TTA, the full stack guard."""
    return {
        "run_dir": str(out / "run"),
        "data": {"root": str(out / "data")},
        "folds": {"k": 5, "seed": 42},
        # 32 px digits: 12 epochs of a random-init test_* model reach ~0.96-0.99 OOF accuracy.
        "train": {"size": 32, "epochs": 12, "batch_size": 64, "lr": 0.002},
        "models": [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}, {"arch": "test_convnext"}],
        "tta": {"n": 4},
    }


def demo_test_accuracy(out: Path) -> float:
    import pandas as pd

    sub = pd.read_csv(out / "run" / "submission.csv", dtype=str)
    truth = pd.read_csv(out / "data" / "test_labels.csv", dtype=str)
    merged = sub.merge(truth, on="image_id", suffixes=("", "_true"))
    return float((merged["label"] == merged["label_true"]).mean())


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stacker", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name, handler, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        p.add_argument("--config", help="run.yaml; default <run>/run.yaml")
        p.add_argument("--run", help="run directory (config key run_dir)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any config key, e.g. --set train.epochs=3 (repeatable)")
        p.add_argument("--force", action="store_true", help="redo and overwrite finished work")
        return p

    p = stage("train-base", cmd_train_base, "make folds and the image cache, train every (model, fold)")
    p.add_argument("--data-root", help="dataset folder (data.root)")
    p.add_argument("--epochs", type=int, help="train.epochs for every model")
    p.add_argument("--device", help="train.device: auto, cpu or cuda")
    p.add_argument("--k", type=int, help="folds.k")
    p.add_argument("--parallel", type=int, default=1, help="jobs at once (one per local GPU)")

    p = stage("predict-oof", cmd_predict_oof, "predict OOF rows and the test set with TTA")
    p.add_argument("--tta-n", type=int, help="augmented TTA views (tta.n)")
    p.add_argument("--models", nargs="+", help="only these models")

    p = stage("fit-stack", cmd_fit_stack, "fit and guard the meta level; write stack/decision.json")
    p.add_argument("--metric", help="stack.metric, e.g. accuracy or neg_log_loss")
    p.add_argument("--test-features", help="stack.test_features: mean (default) or per_fold")
    p.add_argument("--allow-suspicious", action="store_const", const=True,
                   help="keep models whose OOF looks leaked (stack.allow_suspicious)")
    p.add_argument("--models", nargs="+", help="only these models (default: all under preds/)")

    p = stage("submit", cmd_submit, "write the submission CSV in sample_submission's layout")
    p.add_argument("--sample-submission", help="default <data.root>/sample_submission.csv")
    p.add_argument("--out", help="default <run>/submission.csv")
    p.add_argument("--source", help="submit one model's test predictions instead of the stack")

    p = sub.add_parser("demo", help="run all stages on the bundled digits dataset",
                       description="write the digits dataset, run the four stages, report test accuracy")
    p.set_defaults(handler=cmd_demo)
    p.add_argument("--out", default="stacker-demo", help="folder for data, config and run")
    p.add_argument("--force", action="store_true", help="redo finished work")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in pipes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files, never the hub
    try:
        return args.handler(args)
    except StackerError as e:
        print(f"stacker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stacker: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
