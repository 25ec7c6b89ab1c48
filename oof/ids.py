"""Row ids: the one place that checks them unique and puts one table's rows in another's order."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import StackerError, preview


def check_unique(ids, source: str, what: str = "ids") -> None:
    """Raise naming `source` and the first repeated ids when an id occurs twice.

    Args:
        ids: the ids, in file order.
        source: the file (or table) they come from.
        what: how the message names them, e.g. "ids in column 'image_id'".
    """
    ids = np.asarray(ids, dtype=object)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        raise StackerError(f"{source}: duplicate {what}, first {preview(ids[dup])}")


def align(have, want, source: str, what: str) -> np.ndarray:
    """Indices into `have` that put it in `want`'s order; every id of `want` exactly once.

    Args:
        have: (N,) ids of the table being read.
        want: (N,) ids in the order the caller needs.
        source: the table being read, for the message.
        what: which ids `want` holds ("train", "test", "sample_submission.csv").

    Raises:
        StackerError: `have` repeats an id, lacks one of `want`, or has one `want` lacks.
    """
    have = np.asarray(have, dtype=object)
    want = np.asarray(want, dtype=object)
    check_unique(have, source)
    pos = pd.Index(have)
    missing = want[~pd.Index(want).isin(pos)]
    if len(missing):
        raise StackerError(f"{source}: {len(missing)} {what} id(s) missing, first {preview(missing)}")
    extra = have[~pos.isin(want)]
    if len(extra):
        raise StackerError(f"{source}: {len(extra)} id(s) that are not {what} ids, first {preview(extra)}")
    return pos.get_indexer(want)
