"""What a stack was made from, and whether it still matches the run.

decision.json records its inputs, each file by sha256 (read before the table, so a
table replaced while fit-stack reads it is seen as changed next time, never trusted):

    "folds_sha256": the fold assignment (content digest, any row order)
    "groups_sha256": the folds' groups, when they have any (the meta level resamples and splits by them)
    "inputs": {"selection": "all" (every model under preds/) or "given" (--models),
               "tables": {model: {"oof" | "test" | "test_fold<k>" | "repeat<r>/test_fold<k>":
                                      {"path": relative to the run, "sha256": ...}}}}
    "config": the StackConfig

and stack/test.parquet's metadata records `decision_sha256`, the digest of the decision
it was predicted for. fit-stack compares all of it with the run now (`stack_changes`) and
skips a current stack; submit refuses a stale one (`check_stack`).
"""
from __future__ import annotations

import json

from oof import (Folds, RunPaths, StackerError, file_digest, json_default, json_digest, read_json, read_table,
                 remove_temps, table_file)

SELECTIONS = ("all", "given")  # every model with an OOF table under preds/, or the models asked for
SHOWN_CHANGES = 3  # a message names this many changes, then counts the rest


def table_roles(paths: RunPaths, model: str, k: int, repeats: int = 1) -> dict:
    """{role: path} of the tables fit-stack reads for `model`; k > 0 adds the K per-fold test tables of
    every repeat (repeat r > 0's as "repeat<r>/test_fold<k>"), and where present a full fit's test table, the OOF
    view table and metrics.json."""
    roles = {"oof": paths.oof(model), "test": paths.test(model)}
    # Where present: a full fit's test table (`train-base --full`), which stack.test_models may apply; the OOF view
    # table and metrics.json (the measured cost), which a budget's choice and the predicted seconds come from.
    extra = {"test_full": paths.test_full(model), "oof_views": paths.oof_views(model),
             "metrics": paths.predict_metrics(model)}
    roles.update({role: path for role, path in extra.items() if path.is_file()})
    for r in range(repeats):
        prefix = f"repeat{r}/" if r else ""
        roles.update({f"{prefix}test_fold{f}": paths.for_repeat(r).test_fold(model, f) for f in range(k)})
    return {role: table_file(path) for role, path in roles.items()}


def stack_inputs(paths: RunPaths, models: list[str], k: int, given: bool, repeats: int = 1) -> dict:
    """The "inputs" record of a decision: every table of `models` by path and sha256 (None if absent).

    Args:
        paths: the run.
        models: the models stacked, in order.
        k: folds whose per-fold test tables are read (0 with test_features "mean").
        given: the models were named (--models) rather than every model under preds/.
        repeats: the folds' repeats: each repeat's per-fold test tables are recorded.
    """
    tables = {m: {role: {"path": path.relative_to(paths.root).as_posix(),
                         "sha256": file_digest(path) if path.is_file() else None}
                  for role, path in table_roles(paths, m, k, repeats).items()} for m in models}
    return {"selection": SELECTIONS[given], "tables": tables}


def decision_digest(decision: dict) -> str:
    """sha256 of a decision's values, the same for the dict in memory and for decision.json read back."""
    return json_digest(_as_json(decision))


def read_decision(paths: RunPaths) -> dict:
    """decision.json, or a one-line error that says to run fit-stack."""
    if not paths.decision.is_file():
        raise StackerError(f"{paths.decision}: not found; run fit-stack")
    try:
        decision = read_json(paths.decision)
    except (OSError, ValueError) as e:
        raise StackerError(f"{paths.decision}: unreadable ({type(e).__name__}); run fit-stack") from None
    if not isinstance(decision, dict):
        raise StackerError(f"{paths.decision}: not a decision (a JSON object); run fit-stack")
    return decision


def stack_changes(paths: RunPaths, folds: Folds, config_values: dict, inputs: dict) -> tuple[list[str], dict]:
    """What differs between the saved stack and the run now; ([], decision) when it is current.

    Args:
        paths: the run.
        folds: the run's folds now.
        config_values: `StackConfig.to_dict()` of this fit.
        inputs: `stack_inputs` of this fit.
    """
    try:
        decision = read_decision(paths)
    except StackerError:
        return [f"{paths.decision.name} is unreadable"], {}
    try:
        changes = _folds_change(decision, folds) + _config_change(decision, config_values)
        recorded = decision.get("inputs")
        if recorded is None:
            changes.append(f"{paths.decision.name} records no input digests (an older stacker wrote it)")
        else:
            changes += input_changes(recorded, inputs)
    except (KeyError, TypeError, AttributeError):
        return [f"{paths.decision.name} is damaged"], decision
    return (changes or _stack_file_problems(paths, decision)), decision


def _config_change(decision: dict, config_values: dict) -> list[str]:
    old, new = decision.get("config", {}), _as_json(config_values)
    keys = [key for key in dict.fromkeys([*new, *old]) if old.get(key) != new.get(key)]
    return [f"stack config changed ({', '.join(keys)})"] if keys else []


def input_changes(recorded: dict, current: dict) -> list[str]:
    """Models added, removed or reordered, and each table whose path or sha256 differs, in words."""
    old, new = recorded["tables"], current["tables"]
    added, removed = [m for m in new if m not in old], [m for m in old if m not in new]
    changes = [f"model(s) {added} added"] if added else []
    changes += [f"model(s) {removed} removed"] if removed else []
    if not added and not removed and list(old) != list(new):
        changes.append("the models' order changed")
    for model in (m for m in new if m in old):
        for role in dict.fromkeys([*new[model], *old[model]]):
            before, now = old[model].get(role), new[model].get(role)
            if before != now:
                changes.append(f"model {model!r}: {_table_change(before, now)}")
    return changes


def _table_change(before: dict | None, now: dict | None) -> str:
    if before is None:
        return f"{now['path']} is read now and was not before"
    if now is None:
        return f"{before['path']} is no longer read"
    if before["path"] != now["path"]:
        return f"{now['path']} is read instead of {before['path']}"
    return f"{now['path']} is missing" if now["sha256"] is None else f"{now['path']} changed"


def describe(changes: list[str]) -> str:
    """The first few changes, joined for a one-line message."""
    more = f"; +{len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
    return "; ".join(changes[:SHOWN_CHANGES]) + more


def check_stack(paths: RunPaths, folds: Folds) -> str:
    """The digest of the run's decision, after checking it still matches the run (for submit).

    Raises:
        StackerError: no decision; another fold assignment; a table read by fit-stack that changed
            (or, with every model under preds/ stacked, a model added or removed there since);
            a stack/test.parquet predicted for another decision.
    """
    decision = read_decision(paths)
    changes = _folds_change(decision, folds)
    try:
        changes += _inputs_now(paths, decision)
    except (KeyError, TypeError, AttributeError):
        raise StackerError(f"{paths.decision}: damaged (a key is missing); run fit-stack --force") from None
    if changes:
        raise StackerError(f"{paths.decision}: the stack is stale ({describe(changes)}); run fit-stack")
    digest = decision_digest(decision)
    if not paths.stack_test.is_file():
        raise StackerError(f"{paths.stack_test}: not found; run fit-stack")
    if _recorded_decision(paths, decision) != digest:
        raise StackerError(f"{paths.stack_test}: was not predicted for {paths.decision} "
                           "(an interrupted fit-stack?); run fit-stack")
    return digest


def _inputs_now(paths: RunPaths, decision: dict) -> list[str]:
    """How the tables a decision recorded differ from the run's tables now."""
    recorded = decision.get("inputs")
    if recorded is None:
        return ["it records no input digests (an older stacker wrote it)"]
    given = recorded["selection"] == "given"
    models = list(recorded["tables"]) if given else paths.predicted_models()
    # the per-fold test tables fit-stack read (for per_fold features, or for the leak check)
    k = decision["k"] if any("test_fold0" in roles for roles in recorded["tables"].values()) else 0
    return input_changes(recorded, stack_inputs(paths, models, k, given, decision.get("repeats", 1)))


def _folds_change(decision: dict, folds: Folds) -> list[str]:
    old = decision.get("folds_sha256")
    if old != folds.sha256:
        return [f"the folds changed (sha256 {str(old)[:12]} -> {folds.sha256[:12]})"]
    # the meta level's bootstrap, leak check and inner splits follow the groups
    before, now = decision.get("groups_sha256"), folds.groups_sha256
    if before != now:
        return [f"the folds' groups changed (sha256 {str(before)[:12]} -> {str(now)[:12]})"]
    return []


def _stack_file_problems(paths: RunPaths, decision: dict) -> list[str]:
    """Missing stack files, or a test table predicted for another decision (a crash or a hand edit)."""
    files = (paths.stack_state, paths.stack_test, paths.leaderboard, paths.stack_report)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        return [f"stack file(s) {missing} missing"]
    try:
        booster = read_json(paths.stack_state).get("booster")
    except (OSError, ValueError, AttributeError):
        return [f"{paths.stack_state.name} is unreadable"]
    if booster is not None and not (paths.stack / booster).is_file():
        return [f"the booster {booster} is missing"]
    if _recorded_decision(paths, decision) != decision_digest(decision):
        return [f"{paths.stack_test.name} was not predicted for this decision"]
    return []


def _recorded_decision(paths: RunPaths, decision: dict) -> str | None:
    """The decision digest stack/test.parquet records; None when it records none or cannot be read."""
    try:
        return read_table(paths.stack_test, decision["classes"], "test").meta.get("decision_sha256")
    except (StackerError, KeyError, TypeError):
        return None


def clear_stack(paths: RunPaths) -> None:
    """Remove stack/'s files, decision.json first: from then on no decision vouches for the rest.

    Leftover temporaries of a killed atomic write (`.<name>.<random>.tmp`) go too.
    """
    files = (paths.decision, paths.stack_state, paths.stack_booster, paths.stack_test, paths.leaderboard,
             paths.stack_report, paths.stack_oof)
    for path in files:
        path.unlink(missing_ok=True)
    for path in files:
        remove_temps(paths.stack, f"{path.name}.")
    repeat = 1
    while paths.for_repeat(repeat).stack_booster.parent.is_dir():  # repeat r > 0's meta-models, r = 1, 2, ...
        paths.for_repeat(repeat).stack_booster.unlink(missing_ok=True)
        remove_temps(paths.for_repeat(repeat).stack_booster.parent, f"{paths.stack_booster.name}.")
        repeat += 1


def _as_json(value):
    """`value` as it reads back from JSON: tuples become lists, numpy values Python ones."""
    return json.loads(json.dumps(value, default=json_default))
