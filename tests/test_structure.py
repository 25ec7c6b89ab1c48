"""The codebase's shape, checked: small functions, no import cycles, every run file named in one place."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from oof import RunPaths

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("oof", "base_models", "stacker")
MAX_LINES = 50
MAX_PARAMS = 6  # self/cls not counted


def source_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    return files + [REPO / "cli.py", REPO / "stacker_cli.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def param_count(fn: ast.FunctionDef) -> int:
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_small(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    too_long = [f"{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)" for fn in functions(tree)
                if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    too_wide = [f"{fn.name} ({param_count(fn)} parameters)" for fn in functions(tree) if param_count(fn) > MAX_PARAMS]
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"
    assert not too_wide, f"functions over {MAX_PARAMS} parameters: {too_wide}"


# Words that tell history (what changed, and when) instead of what is true: they belong in commit messages
# and dated benchmark tables under docs/, never in a comment or docstring.
HISTORY = re.compile(r"\bissues? #?\d+|\btoday'?s?\b|\bas before\b|\bno longer\b|\bbefore ?-> ?after\b", re.I)


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and every module, class and function docstring."""
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
           if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return sorted(out)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_comments_and_docstrings_state_facts_not_history(path):
    found = [f"line {line}: {m.group(0)!r}" for line, text in comments_and_docstrings(path.read_text(encoding="utf-8"))
             for m in HISTORY.finditer(text)]
    assert not found, f"history words in comments or docstrings: {found}"


def test_the_history_check_sees_comments_and_docstrings_only():
    source = ('"""Module. As before."""\nx = "no longer read"  # see issue 15\n'
              'def f():\n    """Today this is fast."""\n')
    texts = " ".join(text for _, text in comments_and_docstrings(source))
    assert [m.group(0) for m in HISTORY.finditer(texts)] == ["As before", "issue 15", "Today"]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that `path` imports at module level or inside functions."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != here}


def test_no_import_cycles():
    files = source_files()
    known = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, known) for p in files}
    # A package's __init__ re-exports its modules; importing a module of a package runs that __init__
    # first, so an edge into the package's own __init__ from inside it is how Python works, not a cycle.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    cycles = []

    def visit(node, stack):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        for dep in sorted(graph[node]):
            visit(dep, stack + [node])

    for start in sorted(graph):
        visit(start, [])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_package_directions():
    """oof imports nothing of ours; stacker never imports torch or base_models; base_models never stacker."""
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        pkg = module_name(path).split(".")[0]
        if pkg == "oof":
            assert not re.search(r"^\s*(from|import) (base_models|stacker|stacker_cli|cli|torch)\b", text, re.M), path
        if pkg == "stacker":
            assert not re.search(r"^\s*(from|import) (base_models|torch)\b", text, re.M), path
        if pkg == "base_models":
            assert not re.search(r"^\s*(from|import) (stacker|stacker_cli|cli)\b", text, re.M), path


def run_file_names() -> dict[str, re.Pattern]:
    """Every file and folder name RunPaths gives, as a pattern in which the fold and split parts vary."""
    paths = RunPaths("/r")
    names = {paths.config, paths.config_lock, paths.folds, paths.folds_csv, paths.targets, paths.submission,
             paths.submission_record, paths.cache, paths.cache_data("train"), paths.cache_index("train"),
             paths.cache_lock("train"),
             paths.weights("m", 0), paths.history("m", 0), paths.checkpoint("m", 0), paths.job_lock("m", 0),
             paths.preds,
             paths.oof("m"), paths.test("m"), paths.test_fold("m", 0), paths.predict_metrics("m"), paths.stack,
             paths.decision, paths.stack_state, paths.stack_booster, paths.leaderboard, paths.stack_report,
             paths.stack_test, paths.model_dir("m").parent, paths.report, paths.history_csv("m", 0),
             paths.oof_fold("m", 0), paths.oof_plain("m"), paths.oof_plain_fold("m", 0), paths.stage_log("x"),
             paths.stack_oof, paths.duplicates, paths.audit_label_issues, paths.audit_top_losses,
             paths.audit_duplicates, paths.audit_page,
             paths.job_log("m", 0), paths.weights("m", None), paths.history("m", None),
             paths.history_csv("m", None), paths.job_log("m", None), paths.checkpoint("m", None),
             paths.job_lock("m", None), paths.test_full("m"), paths.test_views_full("m"), paths.oof_views("m"),
             paths.oof_views_fold("m", 0), paths.test_views_fold("m", 0)}
    out = {}
    for p in names:
        pattern = re.escape(p.name).replace("0", r"(\d+|\{\})").replace("train", r"(train|test|\{\})")
        out[p.name] = re.compile(r"(?<![\w.])" + pattern + r"(?![\w])")
    return out


def string_literals(tree: ast.AST):
    """(line, text) of every string that is not a docstring; an f-string's fields read as '{}'."""
    docstrings, parts = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            parts |= {id(v) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | parts:
            yield node.lineno, node.value


def test_run_file_names_are_spelled_only_in_run_paths():
    names = run_file_names()
    assert {"run.yaml", "decision.json", "fold0.safetensors", "test.parquet", "stack", "train.u8",
            "duplicates.csv"} <= set(names)
    offenders = []
    for path in source_files():
        if path == REPO / "oof" / "paths.py":
            continue
        for line, text in string_literals(ast.parse(path.read_text(encoding="utf-8"))):
            if any(_spells(name, pattern, text) for name, pattern in names.items()):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not offenders, "run-directory file names outside oof/paths.py:\n" + "\n".join(offenders)


def _spells(name: str, pattern: re.Pattern, text: str) -> bool:
    """Code that builds a path spells the name without spaces around; prose (messages, help) may name a file."""
    if re.search(r"\s", text) or not pattern.search(text):
        return False
    if "." not in name:  # a folder name is also a word (models, stack): only as a path part
        return bool(re.search(rf"(^|/){name}(/|$)", text)) and "/" in text
    return True


def test_every_config_field_has_a_rule():
    from base_models.config import (AugmentConfig, DataConfig, EngineConfig, FoldsConfig, Phase, SamplingConfig,
                                    TrainConfig, TTAConfig)
    from stacker.config import StackConfig, SubmitConfig
    from dataclasses import fields

    for cls in (AugmentConfig, DataConfig, EngineConfig, FoldsConfig, Phase, SamplingConfig, TrainConfig, TTAConfig,
                StackConfig, SubmitConfig):
        unruled = sorted({f.name for f in fields(cls)} - set(cls.RULES))
        assert not unruled, f"{cls.__name__}: fields without a rule: {unruled}"
        assert isinstance(cls.SECTION, str) and cls.SECTION
