"""The leaderboard of a decision: one table for the terminal, report.txt and leaderboard.csv.

With repeated folds (decision "repeats" R > 1) it adds each score's spread across repeats
(std), each candidate's per-repeat scores, and each repeat's own choice with how often it
agrees with the combined one; a one-repeat decision prints as it always did.
"""
from __future__ import annotations

import pandas as pd


def leaderboard_frame(decision: dict) -> pd.DataFrame:
    """One row per base model, per candidate, and the nested estimate."""
    rows = []
    for name, m in decision["models"].items():
        rows.append({"kind": "model", "name": name, "score": m["score"], "log_loss": m["log_loss"],
                     "status": m["status"], "sure_share": m["sure_share"], "consistency": m.get("consistency")})
    for name, c in decision["candidates"].items():
        rows.append({"kind": "candidate", "name": name, "score": c["score"], "log_loss": c["log_loss"],
                     "low": c["interval"][0], "high": c["interval"][1], "gain": c["gain"],
                     "gain_low": c["gain_interval"][0], "gain_high": c["gain_interval"][1],
                     "win_probability": c["win_probability"], "admissible": c["admissible"],
                     "chosen": name == decision["chosen"]})
    nested = decision.get("nested")
    if nested:
        rows.append({"kind": "nested", "name": decision["chosen"], "score": nested["score"],
                     "log_loss": nested["log_loss"],
                     "status": " ".join(f["chosen"] for f in nested["folds"])})
    columns = ["kind", "name", "score", "log_loss", "low", "high", "gain", "gain_low", "gain_high",
               "win_probability", "admissible", "chosen", "status", "sure_share", "consistency"]
    if decision.get("repeats", 1) > 1:  # the spread across repeats, and the repeats' own scores
        columns += ["repeat_std", "repeat_scores"]
        nested = [nested] if nested else []
        for row, record in zip(rows, [*decision["models"].values(), *decision["candidates"].values(), *nested]):
            row["repeat_std"] = record["repeat_std"]
            row["repeat_scores"] = " ".join(f"{s:.6f}" for s in record["repeat_scores"])
    return pd.DataFrame(rows, columns=columns)


def _repeat_lines(decision: dict) -> list[str]:
    """Per-repeat scores and spread, each repeat's own choice and the agreement; [] with one repeat."""
    repeats = decision.get("repeats", 1)
    if repeats < 2:
        return []
    head = " ".join(f"{f'repeat {r}':>9}" for r in range(repeats))
    lines = ["", f"{'per repeat (own OOF, own folds)':<34}{head}{'sd':>9}"]
    for name, record in [*decision["models"].items(), *decision["candidates"].items()]:
        scores = " ".join(f"{s:>9.4f}" for s in record["repeat_scores"])
        lines.append(f"  {name:<32}{scores}{record['repeat_std']:>9.4f}")
    own = ", ".join(f"{d['repeat']}: {d['chosen']}" for d in decision["repeat_decisions"])
    lines.append(f"each repeat's own choice: {own}; {decision['agreement']:.0%} of repeats agree with the "
                 f"combined choice ({decision['chosen']}, scored on all {repeats} repeats)")
    return lines


def format_report(decision: dict, timings: dict | None = None) -> str:
    """The leaderboard as text: models, candidates (chosen marked *), the choice, the nested estimate."""
    metric = decision["metric"]
    conf = decision["config"]["confidence"]
    # OOF/test z: how far a model's OOF rows stand from its test rows, against the other models (stacker.leak)
    lines = [f"{'model':<28}{metric:>12}{'log_loss':>10}{'sure rows':>11}{'OOF/test z':>12}  status"]
    for name, m in decision["models"].items():
        z = "-" if m.get("consistency") is None else f"{m['consistency']:.1f}"
        lines.append(f"  {name:<26}{m['score']:>12.4f}{m['log_loss']:>10.4f}{m['sure_share']:>11.1%}{z:>12}  "
                     f"{m['status']}")
    lines += ["", f"{'candidate (meta-level OOF)':<28}{metric:>12}{f'{conf:.0%} interval':>22}"
                  f"{'gain vs mean':>14}{'win p':>8}{'log_loss':>10}{'fit s':>8}"]
    for name, c in decision["candidates"].items():
        mark = "*" if name == decision["chosen"] else " "
        win = "-" if c["win_probability"] is None else f"{c['win_probability']:.3f}"
        interval = f"[{c['interval'][0]:.4f}, {c['interval'][1]:.4f}]"
        seconds = "" if timings is None else f"{timings.get(name, 0):8.1f}"
        lines.append(f"{mark} {name:<26}{c['score']:>12.4f}{interval:>22}{c['gain']:>+14.4f}{win:>8}"
                     f"{c['log_loss']:>10.4f}{seconds}")
    lines += _repeat_lines(decision)
    lines += ["", f"chosen: {decision['chosen']}: {decision['reason']}"]
    for name, why in decision["excluded"].items():
        lines.append(f"excluded as suspicious: {name}: {why}")
    nested = decision.get("nested")
    if nested:
        choices = ", ".join(f["chosen"] for f in nested["folds"])
        spread = f", sd {nested['repeat_std']:.4f} across repeats" if "repeat_std" in nested else ""
        lines.append(f"nested estimate of what submit uses: {metric} {nested['score']:.4f}{spread}, "
                     f"log_loss {nested['log_loss']:.4f} (outer folds chose: {choices})")
    else:
        lines.append("nested estimate: off ({}); the chosen score above is optimistic".format(
            decision.get("nested_note", "stack.nested is false")))
    if decision.get("predict"):
        lines.append(predict_line(decision["predict"]))
    if decision.get("test_side"):
        lines.append(test_side_line(decision["test_side"]))
    lines += [f"warning: {w}" for w in decision.get("warnings", [])]
    return "\n".join(lines) + "\n"


TEST_SIDES = {"folds": "the fold models", "full": "the full fits (train-base --full)",
              "both": "the fold models and the full fits (train-base --full), each full fit as one more fold"}


def test_side_line(side: dict) -> str:
    """decision.json's "test_side" in one line: what the stack is applied to, and whether anything scores it."""
    text = f"test side: {TEST_SIDES[side['models']]}"
    if not side["validated"]:
        text += "; UNVALIDATED: no OOF row comes from a full fit, so no score above measures it"
    return text + (f" ({side['note']})" if "note" in side else "")


def predict_line(predict: dict) -> str:
    """decision.json's "predict" in one line: the stack's predicted test seconds, the budget, the whole ensemble's."""
    budget = "no budget" if predict["budget"] is None else f"budget {predict['budget']:g} s"
    return (f"predicted test time: {predict['seconds']:.4g} s for {predict['rows']} images ({budget}; "
            f"whole ensemble {predict['ensemble_seconds']:.4g} s)")
