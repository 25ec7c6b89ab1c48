"""The contract between stacker's stages: run paths, folds, prediction tables, atomic writes.

Imports numpy, pandas and pyarrow only, so any tool can read and write these files.
"""
from .config import build_config
from .atomic import atomic_path, read_csv_strings, read_json, write_bytes, write_json, write_text
from .errors import StackerError, preview
from .folds import Folds, folds_from_table, load_folds, make_folds, write_folds
from .paths import RunPaths, check_model_name
from .tables import (PredictionTable, check_rows, read_table, table_from_frame, validate_oof,
                     validate_test, write_table)

__version__ = "0.1.0"

__all__ = [
    "Folds", "PredictionTable", "RunPaths", "StackerError", "__version__", "atomic_path", "build_config",
    "check_model_name", "check_rows", "folds_from_table", "load_folds", "make_folds", "preview",
    "read_csv_strings", "read_json", "read_table", "table_from_frame", "validate_oof", "validate_test",
    "write_bytes", "write_folds", "write_json", "write_table", "write_text",
]
