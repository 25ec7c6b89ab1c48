"""The engine registry: an engine is one `Engine` subclass plus one `ENGINES` entry. A test-only engine,
registered here alone, validates as `engine.name`, is a `--engine` choice, and runs a real train-base and
predict-oof grid whose weights and tables are the local engine's; an unregistered name fails in one line."""
from __future__ import annotations

import re
from typing import ClassVar

import pytest
import yaml

import stacker_cli as cli
from base_models import engines
from base_models.config import EngineConfig, TTAConfig, engine_config, model_specs
from base_models.engines import Engine, failed, timed_job
from base_models.jobs import StageOptions
from base_models.predict_oof import predict_oof
from oof import RunPaths, StackerError, file_digest, load_folds, read_table

MODEL = "test_resnet"
K = 3
TINY = {"size": 16, "epochs": 1, "batch_size": 32, "lr": 3e-3}


class LastFirst(Engine):
    """A test-only engine: every job in this process, the last job first; `ran` records the jobs' keys."""

    ran: ClassVar[list] = []

    def run(self, work, jobs, workers, log, stage):
        results = {}
        for i in reversed(range(len(jobs))):
            type(self).ran.append(jobs[i].key)
            try:
                results[i] = timed_job(work, jobs[i])
            except StackerError as e:  # a job's error is its result, as on every engine
                results[i] = failed(jobs[i], str(e))
        log(f"{stage}: last-first engine, {len(jobs)} jobs")
        return [results[i] for i in range(len(jobs))]


@pytest.fixture
def last_first(monkeypatch):
    """`last_first` registered for this test alone; the keys of the jobs it ran."""
    monkeypatch.setitem(engines.ENGINES, "last_first", LastFirst)
    monkeypatch.setattr(LastFirst, "ran", [])
    return LastFirst.ran


def train_base_cli(tmp_path, data_dir, name: str, *flags) -> RunPaths:
    """`stacker train-base` in this process on a fresh run of one model and K folds."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / name), "data": {"root": str(data_dir)},
                                      "folds": {"k": K}, "train": TINY, "models": [{"arch": MODEL}]}))
    assert cli.main(["train-base", "--config", str(config), "-q", *flags]) == 0
    return RunPaths(tmp_path / name)


def weights(paths: RunPaths) -> dict:
    return {f: file_digest(paths.weights(MODEL, f)) for f in range(K)}


def test_a_registered_engine_runs_the_grid_and_gives_the_local_engines_results(tmp_path, small_digits_dir,
                                                                                 last_first, restore_logging):
    local = train_base_cli(tmp_path, small_digits_dir, "local", "--engine", "local")
    assert last_first == []  # one local worker: the jobs ran in this process, not through an engine
    mine = train_base_cli(tmp_path, small_digits_dir, "mine", "--engine", "last_first")
    assert last_first == [(MODEL, 0, f) for f in reversed(range(K))]
    assert weights(mine) == weights(local)
    assert all("started on" in mine.job_log(MODEL, f).read_text() for f in range(K))  # each job in a worker's role

    folds, specs, tta = load_folds(local.folds), model_specs([{"arch": MODEL}], TINY), TTAConfig(n=1)
    last_first.clear()
    predict_oof(mine, specs, folds, tta, options=StageOptions(log=lambda s: None,
                                                              engine=EngineConfig(name="last_first")))
    predict_oof(local, specs, folds, tta, options=StageOptions(log=lambda s: None))
    assert last_first == [(MODEL, 0, f) for f in reversed(range(K))]
    for table, kind in ((RunPaths.oof, "oof"), (RunPaths.test, "test")):
        ours, theirs = (read_table(table(p, MODEL), folds.classes, kind).proba for p in (mine, local))
        assert (ours == theirs).all(), kind


def test_a_registered_engine_is_a_config_and_cli_vocabulary_word(last_first):
    assert engine_config({"engine": {"name": "last_first"}}).name == "last_first"
    with pytest.raises(StackerError, match=r"^engine\.name: expected one of \['local', 'ray', 'last_first'\], "
                                           r"got 'dask'$"):
        engine_config({"engine": {"name": "dask"}})
    args = cli.build_parser().parse_args(["train-base", "--engine", "last_first"])  # built after registering
    assert args.engine == "last_first" and cli.resolve_config(args)["engine"] == {"name": "last_first"}
    assert cli.build_parser().parse_args(["predict-oof", "--engine", "last_first"]).engine == "last_first"


def test_an_unregistered_engine_is_refused_in_one_line(tmp_path, capsys, restore_logging):
    with pytest.raises(StackerError, match=r"^engine\.name: expected one of \['local', 'ray'\], got 'last_first'$"):
        EngineConfig(name="last_first")
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["train-base", "--engine", "last_first"])
    assert e.value.code == 2
    assert re.search(r"^stacker train-base: error: argument --engine: invalid choice: 'last_first' "
                     r"\(choose from '?local'?, '?ray'?\)$", capsys.readouterr().err.strip().splitlines()[-1])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "models": [{"arch": MODEL}]}))
    assert cli.main(["train-base", "--config", str(config), "--set", "engine.name=last_first"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stacker: error: engine.name: expected one of ['local', 'ray'], got 'last_first'"]
    assert not (tmp_path / "run").exists()


def test_the_cli_offers_the_config_vocabularies():
    from base_models.config import DEVICES
    from stacker.config import SUBMIT_FORMATS, SubmitConfig

    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage").choices
    flags = {(stage, a.option_strings[0]): a.choices for stage, p in sub.items() for a in p._actions
             if a.choices is not None and a.option_strings}
    assert flags == {("train-base", "--engine"): tuple(engines.ENGINES),
                     ("predict-oof", "--engine"): tuple(engines.ENGINES),
                     ("submit", "--format"): SUBMIT_FORMATS, ("predict", "--format"): SUBMIT_FORMATS,
                     ("predict", "--device"): DEVICES}
    assert SubmitConfig.RULES["format"][0].text == f"one of {list(SUBMIT_FORMATS)}"
