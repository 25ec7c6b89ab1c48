"""stacker's command line: parse the config and flags, call one stage, turn errors into exit codes.

    stacker train-base  --config run.yaml     folds, image cache, one job per (model, fold); with --full
                                              one more per model on every train row (its full fit)
    stacker predict-oof --run DIR             TTA predictions: OOF and test tables
    stacker fit-stack   --run DIR             guarded meta level: stack/decision.json
    stacker submit      --run DIR             submission.csv in sample_submission's layout
    stacker predict     --run DIR --images D --out OUT   a new test set through a finished (moved,
                                              read-only) run's stack: OUT/submission.csv
    stacker jobs        --run DIR             every (model, fold) job: done, running, partial, pending, stale
    stacker leaderboard --run DIR [--csv P]   each model's OOF scores, ECE and times; the stack's candidates
    stacker report      --run DIR             DIR/report.html: plots and tables of the whole run, one file
    stacker audit       --run DIR             DIR/audit/: top losses, most confused, likely label errors,
                                              duplicates, as CSVs and a page of thumbnails
    stacker demo        [--out DIR]           all four on the bundled digits dataset

The stages that need torch import it inside their handler: fit-stack and submit
run in a process that never imports torch. The parser's choices come from the
vocabularies that check the same keys (`base_models.config`, the engine registry
`base_models.engines.ENGINES`, `oof.run_config`), modules that import no torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from base_models.config import DEVICES
from base_models.engines import ENGINES
from oof import LOGGER, RunPaths, StackerError, info, load_config, run_paths
from oof.run_config import SUBMIT_FORMATS

# Named flags and the config key each one overrides; their argparse default is
# "not given", so every default lives in the config dataclasses alone.
FLAG_KEYS = {
    "run": "run_dir", "data_root": "data.root", "epochs": "train.epochs", "device": "train.device",
    "k": "folds.k", "tta_n": "tta.n", "metric": "stack.metric", "test_features": "stack.test_features",
    "allow_suspicious": "stack.allow_suspicious", "format": "submit.format", "engine": "engine.name",
    "address": "engine.address",
}


def resolve_config(args) -> dict:
    """--config (else <run>/run.yaml), then the named flags, then --set KEY=VALUE."""
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag, None) is not None}
    return load_config(args.config, getattr(args, "run", None), overrides, args.set or [])


# ---------------------------------------------------------------- stages


def need_training_packages(stage: str) -> None:
    """The training side's packages (the `train` extra), checked before a stage that needs them starts."""
    import importlib.util

    missing = []
    for name in ("torch", "timm"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise StackerError(f"{stage} needs {' and '.join(missing)}, which are not installed: "
                           "pip install 'stacker[train]' (fit-stack and submit run without them)")


def cmd_train_base(args, log=info) -> int:
    need_training_packages("train-base")
    from base_models.stages import train_base_stage
    from stacker import stack_config

    cfg = resolve_config(args)
    stack_config(cfg)  # the stack section too is checked before hours of training, not after
    train_base_stage(cfg, args.force, args.parallel, log, only=args.only, full=args.full)
    return 0


def cmd_predict_oof(args, log=info) -> int:
    need_training_packages("predict-oof")
    from base_models.stages import predict_oof_stage

    predict_oof_stage(resolve_config(args), args.models, args.force, log, args.parallel, args.only)
    return 0


def cmd_jobs(args, log=print) -> int:  # a view: its table is the output, -q or not
    from base_models.job_table import job_table

    job_table(resolve_config(args), log)
    return 0


def cmd_report(args, log=info) -> int:
    from stacker.html_report import write_report

    log(f"report: {write_report(run_paths(resolve_config(args)).root)}")
    return 0


def cmd_audit(args, log=info) -> int:
    from stacker.audit_html import run_audit

    audit, files = run_audit(run_paths(resolve_config(args)).root)
    log(f"audit: {audit.summary()}")
    for row in audit.label_issues.head(5).itertuples():
        log(f"  likely label error: {row.id} given {row.label}, suggested {row.suggested} "
            f"(quality {row.quality:.3f}, {row.models_agree}/{row.models} models agree)")
    log(f"audit: {', '.join(str(f) for f in files)}")
    return 0


def cmd_leaderboard(args, log=print) -> int:  # a view: its table is the output, -q or not
    from stacker.leaderboard import print_leaderboard

    print_leaderboard(run_paths(resolve_config(args)).root, args.csv, log)
    return 0


def cmd_fit_stack(args, log=info) -> int:
    from stacker import fit_stack, stack_config

    from stacker.html_report import write_report

    cfg = resolve_config(args)
    fit_stack(run_paths(cfg).root, stack_config(cfg), models=args.models, force=args.force, log=log)
    log(f"fit-stack: the run in one page: {write_report(run_paths(cfg).root)}")  # a view: remade each time
    return 0


def cmd_submit(args, log=info) -> int:
    from base_models.config import sample_submission_path
    from stacker import stack_config, submit_config, write_submission

    cfg = resolve_config(args)
    sample = args.sample_submission or sample_submission_path(cfg)
    fmt = submit_config(cfg).format
    write_submission(run_paths(cfg).root, sample, args.out, source=args.source, force=args.force, log=log,
                     fmt=fmt, metric=submit_metric(cfg, args.source, stack_config(cfg).metric))
    return 0


def submit_metric(cfg: dict, source: str | None, configured: str) -> str:
    """The metric that decides an ambiguous submission layout: the stack's own (fit-stack --metric may
    differ from run.yaml), else the configured one (a single model's table, or no stack yet)."""
    from oof import read_json

    decision = run_paths(cfg).decision
    if source is None and decision.is_file():
        return read_json(decision).get("metric") or configured
    return configured


def cmd_predict(args, log=info) -> int:
    need_training_packages("predict")
    from base_models.dataset import NewTestImages
    from base_models.jobs import StageOptions
    from base_models.stages import predict_stage
    from stacker import submit_config
    from oof.views import renders
    from stacker.apply import apply_stack, saved_stack

    cfg = resolve_config(args)
    run = run_paths(cfg).root
    images = NewTestImages(args.images, args.csv, args.id_column, args.path_column, args.sample_submission)
    decision = saved_stack(run).decision_
    ratio = (decision.get("predict") or {}).get("speed_ratio", 1.0)  # the card the stack was budgeted for
    predict_stage(cfg, images, args.out, renders(decision),
                  StageOptions(force=args.force, log=log, device=args.predict_device, speed_ratio=ratio), args.budget)
    apply_stack(run, args.out, args.sample_submission, args.force, log, fmt=submit_config(cfg).format)
    return 0


STAGES = (("train-base", cmd_train_base), ("predict-oof", cmd_predict_oof), ("fit-stack", cmd_fit_stack),
          ("submit", cmd_submit))


def cmd_demo(args, log=info) -> int:
    need_training_packages("demo")
    from base_models.demo import finish_demo, prepare_demo

    t0 = time.perf_counter()
    config = prepare_demo(args.out, log)
    stage_args = argparse.Namespace(config=str(config), run=None, set=None, force=args.force, parallel=1,
                                    models=None, sample_submission=None, out=None, source=None, format=None,
                                    only=None, full=False)
    for name, stage in STAGES:
        log(f"\n== stacker {name} --config {config}")
        with stage_log(RunPaths(resolve_config(stage_args)["run_dir"]).stage_log(name)):
            stage(stage_args, log)
    finish_demo(args.out, time.perf_counter() - t0, log)
    return 0


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

    train_base_arguments(stage("train-base", cmd_train_base, "make folds and the image cache, train every "
                               "(model, fold)"))

    p = stage("predict-oof", cmd_predict_oof, "predict OOF rows and the test set with TTA, one job per "
              "(model, fold)")
    p.add_argument("--tta-n", type=int, help="augmented TTA views (tta.n)")
    p.add_argument("--models", nargs="+", help="only these models")
    job_arguments(p, "predict just this job, e.g. resnet26d:0 (repeatable); a model's tables are written once "
                     "all its folds are predicted")

    p = stage("fit-stack", cmd_fit_stack, "fit and guard the meta level; write stack/decision.json")
    p.add_argument("--metric", help="stack.metric, e.g. accuracy or neg_log_loss")
    p.add_argument("--test-features", help="stack.test_features: mean (default) or per_fold")
    p.add_argument("--allow-suspicious", action="store_const", const=True,
                   help="keep models whose OOF looks leaked (stack.allow_suspicious)")
    p.add_argument("--models", nargs="+", help="only these models (default: all under preds/)")

    submit_arguments(stage("submit", cmd_submit, "write the submission CSV in sample_submission's layout"))

    predict_arguments(stage("predict", cmd_predict, "predict a new test set with a finished run (which may be "
                            "moved and read-only): every fold model its stack uses, the stack, OUT/submission.csv"))
    read_only_parsers(sub)

    p = sub.add_parser("demo", help="run all stages on the bundled digits dataset",
                       description="write the digits dataset, run the four stages, report test accuracy")
    p.set_defaults(handler=cmd_demo)
    p.add_argument("--out", default="stacker-demo", help="folder for data, config and run")
    p.add_argument("--force", action="store_true", help="redo finished work")
    for p in sub.choices.values():  # -q / -v on every command
        verbosity_arguments(p)
    return parser


def submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-submission", help="default <data.root>/sample_submission.csv")
    p.add_argument("--out", help="default <run>/submission.csv")
    p.add_argument("--source", help="submit one model's test predictions instead of the stack")
    p.add_argument("--format", choices=SUBMIT_FORMATS,
                   help="submit.format: labels, per-class probabilities, or auto (default: from the sample "
                        "and stack.metric)")


def train_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="dataset folder (data.root)")
    p.add_argument("--epochs", type=int, help="train.epochs for every model")
    p.add_argument("--device", help=f"train.device: one of {', '.join(DEVICES)}")
    p.add_argument("--k", type=int, help="folds.k")
    job_arguments(p, "train just these jobs, e.g. resnet26d:0 (repeatable; one per Slurm array task); the folds "
                     "and cache are still made; with --force only these jobs are redone; with --full name models, "
                     "e.g. --only resnet26d convnext_tiny", many=True)
    p.add_argument("--full", action="store_true",
                   help="train each model once more on every train row (no fold held out, the fold jobs' recipe and "
                        "epochs) in place of its fold jobs: the full fit predict-oof then predicts the test set with; "
                        "refused for train.keep: best")


def job_arguments(p: argparse.ArgumentParser, only_help: str, many: bool = False) -> None:
    """The (model, fold) job grid's flags: how many at once, which ones (`many`: several after one --only),
    on which engine."""
    p.add_argument("--parallel", type=int, default=1, help="jobs at once on CPU (on CUDA: one per visible GPU)")
    p.add_argument("--only", action="extend" if many else "append", nargs="+" if many else None, metavar="MODEL:FOLD",
                   help=only_help)
    p.add_argument("--engine", choices=tuple(ENGINES),  # read when the parser is built: registered engines count
                   help="engine.name: where the jobs run (default local)")
    p.add_argument("--address", help="engine.address: the Ray cluster to join (default RAY_ADDRESS or a new one)")


def jobs_parser(sub) -> None:
    text = ("every (model, fold) job of a run and its state (done, running, partial at epoch e, pending, stale), "
            "device, time and score; reads the run, writes nothing")
    p = sub.add_parser("jobs", help=text, description=text)
    p.set_defaults(handler=cmd_jobs)
    p.add_argument("--config", help="run.yaml; default <run>/run.yaml")
    p.add_argument("--run", help="run directory (config key run_dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")


def read_only_parsers(sub) -> None:
    """`jobs`, `report`, `audit` and `leaderboard`: they read the run and write only their own output; the last
    three need no torch."""
    jobs_parser(sub)
    texts = {"report": "write <run>/report.html: leaderboard, training curves, OOF correlations, calibration, "
                       "the stack's decision, confusion matrix, the audit, config; one self-contained file",
             "audit": "write <run>/audit/: the train images the models get most confidently wrong, the most "
                      "confused classes, likely label errors (confident learning over the OOF rows), the "
                      "duplicate clusters; CSVs and a page of thumbnails; needs no torch",
             "leaderboard": "print each model's OOF scores (with and without TTA), log-loss, ECE and times as "
                            "soon as one model has predictions; the stack's candidates once fit-stack has run"}
    for name, handler in (("report", cmd_report), ("audit", cmd_audit), ("leaderboard", cmd_leaderboard)):
        p = sub.add_parser(name, help=texts[name], description=texts[name])
        p.set_defaults(handler=handler)
        p.add_argument("--config", help="run.yaml; default <run>/run.yaml")
        p.add_argument("--run", help="run directory (config key run_dir)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        if name == "leaderboard":
            p.add_argument("--csv", metavar="PATH", help="also write the leaderboard as CSV to PATH")


def predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of the new test images (ids: file names)")
    p.add_argument("--csv", help="CSV listing the images instead: an id column, optionally a path column")
    p.add_argument("--id-column", help="id column of --csv (default: its first column)")
    p.add_argument("--path-column", help="column of --csv with each file's path under --images "
                                         "(default: the file is <images>/<id>)")
    p.add_argument("--sample-submission", help="gives the ids, their order and the columns; default: id,label "
                                               "with the images' ids sorted")
    p.add_argument("--out", required=True, help="output folder (cache, tables, submission.csv); never the run")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="refuse, before decoding, when the predicted time (predict-oof's measured costs) is more")
    p.add_argument("--format", choices=SUBMIT_FORMATS, help="submit.format, as for submit")
    # its own dest: not FLAG_KEYS' train.device, which each model's own device key of run.yaml overrides
    p.add_argument("--device", dest="predict_device", choices=DEVICES,
                   help="predict every model on this device (default: each model's train.device in the run); "
                        "on the CPU in float32 (amp off)")


def verbosity_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress)")
    group.add_argument("-v", "--verbose", action="store_true", help="also debug lines")


def configure_logging(args) -> None:
    """The `stacker` logger to the console: INFO lines as plain text (WARNING with -q, DEBUG with -v)."""
    level = logging.WARNING if getattr(args, "quiet", False) else logging.DEBUG if getattr(args, "verbose", False) \
        else logging.INFO
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(level)
    LOGGER.handlers = [console]
    LOGGER.setLevel(min(level, logging.INFO))  # the stage's log file gets INFO whatever the console shows
    LOGGER.propagate = False
    logging.captureWarnings(True)  # warnings.warn from our code and the libraries: logged, not bare stderr
    logging.getLogger("py.warnings").handlers = [console]


class StageLogFile(logging.FileHandler):
    """A stage's log file, opened (and its folder made) at the first line: a stage that stops at its
    checks writes nothing, so `stacker predict --out <inside the run>` never touches the run."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def stage_log(path: Path | None):
    """Everything the stage logs is also appended to `path` (<run>/logs/<stage>.log), with a timestamp."""
    if path is None:
        yield
        return
    handler = StageLogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


def stage_log_path(args) -> Path | None:
    """Where a stage's log file goes: <run>/logs/<stage>.log; `stacker predict` writes into OUT, never the
    run; commands that only read (jobs, report views) and a config that does not resolve: none."""
    if args.stage not in {name for name, _ in STAGES} | {"predict"}:
        return None
    try:
        root = Path(args.out) if args.stage == "predict" else run_paths(resolve_config(args)).root
    except StackerError:
        return None  # the stage itself reports the config error
    return RunPaths(root).stage_log(args.stage)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in pipes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files, never the hub
    configure_logging(args)
    try:
        with stage_log(stage_log_path(args)):
            return args.handler(args)
    except StackerError as e:
        print(f"stacker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stacker: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
