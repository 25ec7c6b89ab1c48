"""The contract between stacker's stages: run paths, folds, prediction tables, ids, metrics, config.

Imports numpy, pandas, pyarrow and pyyaml only, so any tool can read and write these files.
"""
from .atomic import (atomic_path, json_default, read_csv_strings, read_json, remove_temps, write_bytes, write_json,
                     write_text)
from .config import (BOOL, NULL, SEED, STRING, ConfigSection, Rule, build_config, check_fields, each, instance,
                     number, one_of)
from .edits import DataEdits, apply_edits, base_folds, check_edits, edits_line, in_order, read_edits
from .errors import StackerError, preview
from .folds import (ExcludedRow, FoldEdits, Folds, check_groups_whole, folds_from_table, group_folds, load_folds, make_folds,
                    make_group_folds, merge_groups, read_fold_file, repeat_seed, write_folds)
from .ids import align, check_unique
from .metrics import EPS, accuracy, log_loss, log_loss_rows
from .provenance import file_digest, json_digest
from .paths import RunPaths, check_model_name, record_of, table_file
from .progress import LOGGER, GridProgress, bar, duration, info
from .run_config import load_config, read_yaml, run_paths, write_run_config
from .tables import (PredictionTable, check_rows, read_table, table_from_frame, validate_oof,
                     validate_test, write_table)

__version__ = "0.1.0"

__all__ = [
    "__version__", "accuracy", "align", "apply_edits", "base_folds", "check_edits", "edits_line", "in_order",
    "read_edits", "DataEdits", "ExcludedRow", "FoldEdits", "atomic_path", "build_config", "check_fields", "check_model_name",
    "check_groups_whole", "check_rows", "check_unique", "each", "file_digest", "folds_from_table", "group_folds", "instance",
    "json_default", "json_digest", "load_config", "load_folds", "log_loss", "log_loss_rows", "make_folds",
    "make_group_folds", "merge_groups", "number", "one_of", "preview", "read_csv_strings", "read_fold_file", "record_of",
    "remove_temps", "repeat_seed", "read_json", "read_table", "read_yaml", "run_paths", "table_file",
    "table_from_frame", "validate_oof", "validate_test", "write_bytes", "write_folds", "write_json",
    "write_run_config", "write_table", "write_text", "BOOL", "ConfigSection", "EPS", "Folds", "NULL",
    "PredictionTable", "Rule", "RunPaths", "SEED", "STRING", "StackerError", "LOGGER", "GridProgress", "bar",
    "duration", "info",
]
