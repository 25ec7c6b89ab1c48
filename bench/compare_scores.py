"""Compare two `stack_bench.py --scores` files: the choice, the nested choices, and each candidate's
meta-OOF score (the gate: the same choice and nested choices, every score within --tolerance of the reference).

    python bench/compare_scores.py BEFORE.json AFTER.json [--tolerance 0.002]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.002)
    args = parser.parse_args(argv)
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    ok = True
    print(f"{'candidate':<22}{'before':>9}{'after':>9}{'diff':>9}  {'log_loss before':>15}{'after':>9}")
    for name, score in before["scores"].items():
        new = after["scores"].get(name)
        diff = float("nan") if new is None else new - score
        ok &= new is not None and abs(diff) <= args.tolerance
        print(f"{name:<22}{score:9.4f}{new if new is not None else float('nan'):9.4f}{diff:+9.4f}  "
              f"{before['log_loss'][name]:15.4f}{after['log_loss'].get(name, float('nan')):9.4f}")
    for key in ("chosen", "nested_chosen"):
        same = before[key] == after[key]
        ok &= same
        print(f"{key}: {before[key]} -> {after[key]}{'' if same else '  CHANGED'}")
    print("same decision, scores within tolerance" if ok else "DIFFERENT")
    return ok


if __name__ == "__main__":
    main()
