"""What a prediction table's metadata records, by schema version, and when a table is current.

Schema 2 records the TTA views themselves (`tta.views`: each view's flip, zoom, cx, cy, in the order they
are rendered, the plain view not among them) beside `tta.n`, so a table says what it was made from
whatever `tta_views` gives later. A table without `schema` is schema 1: it records `tta.n` alone, which
means the first n views of `SCHEMA1_VIEWS`, the list `tta_views` gave when schema 1 was current.
"""
from __future__ import annotations

from numbers import Real

from oof import StackerError

from .augment import View

TABLE_SCHEMA = 2

# The views a schema-1 table's `tta.n` names: its first n. A literal, so that no change of `tta_views`
# changes what an old table means.
SCHEMA1_VIEWS = (
    View(flip=True, zoom=1.0, cx=0.0, cy=0.0),
    View(flip=False, zoom=0.85, cx=0.0, cy=0.0),
    View(flip=True, zoom=0.85, cx=0.0, cy=0.0),
    View(flip=False, zoom=0.85, cx=-1.0, cy=-1.0),
    View(flip=True, zoom=0.85, cx=-1.0, cy=-1.0),
    View(flip=False, zoom=0.85, cx=1.0, cy=1.0),
    View(flip=True, zoom=0.85, cx=1.0, cy=1.0),
    View(flip=False, zoom=0.85, cx=-1.0, cy=1.0),
    View(flip=True, zoom=0.85, cx=-1.0, cy=1.0),
    View(flip=False, zoom=0.85, cx=1.0, cy=-1.0),
    View(flip=True, zoom=0.85, cx=1.0, cy=-1.0),
)

# Recorded but not compared: a new version of the toolkit predicts the same weights the same way, and a
# fold table's `job` holds what its job measured (its seconds), not what it came from.
UNCOMPARED_META = ("version", "job")

VIEW_KEYS = ("flip", "zoom", "cx", "cy")


def view_records(views) -> list[dict]:
    """Views as a table's metadata records them: one {flip, zoom, cx, cy} per view, in order."""
    return [{"flip": bool(v.flip), "zoom": float(v.zoom), "cx": float(v.cx), "cy": float(v.cy)} for v in views]


def upgraded(meta: dict) -> dict:
    """A table's metadata as the current schema reads it: a schema-1 record gains `schema` and the views
    its `tta.n` names (`SCHEMA1_VIEWS`); any other record is returned as it is."""
    tta = meta.get("tta")
    if "schema" in meta or not isinstance(tta, dict) or "views" in tta:
        return meta
    n = tta.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(SCHEMA1_VIEWS):
        return meta
    return {**meta, "schema": TABLE_SCHEMA, "tta": {**tta, "views": view_records(SCHEMA1_VIEWS[:n])}}


def stale_keys(recorded: dict, expected: dict) -> list[str]:
    """The metadata keys a table records otherwise than `expected`, sorted, but those never compared
    (`UNCOMPARED_META`); "tta views" where the TTA settings differ in their views alone. Both are read
    as the current schema (`upgraded`): a schema-1 table is current when its n's views are those expected.
    """
    recorded, expected = upgraded(recorded), upgraded(expected)
    keys = sorted(key for key in set(recorded) | set(expected)
                  if key not in UNCOMPARED_META and recorded.get(key) != expected.get(key))
    if "tta" in keys and _settings(recorded.get("tta")) == _settings(expected.get("tta")):
        keys[keys.index("tta")] = "tta views"
    return keys


def is_current(recorded: dict, expected: dict) -> bool:
    """Whether a table's metadata records what `expected` says it must be made from (`stale_keys`)."""
    return not stale_keys(recorded, expected)


def _settings(tta) -> dict | None:
    """The TTA settings but the views."""
    return {k: v for k, v in tta.items() if k != "views"} if isinstance(tta, dict) else None


def recorded_views(meta: dict, source: str = "table") -> list[View]:
    """The TTA views (plain view excluded, in order) a table's metadata says its predictions render.

    Args:
        meta: a predict-oof table's metadata, schema 1 or 2.
        source: the table, for the error.

    Raises:
        StackerError: a schema this toolkit does not read, or views that are missing, malformed or not
            `tta.n` of them.
    """
    schema = meta.get("schema", 1)
    if schema not in (1, TABLE_SCHEMA):
        raise StackerError(f"{source}: table metadata schema {schema!r}, this stacker reads schemas 1 to "
                           f"{TABLE_SCHEMA}; predict with the stacker that wrote it (version "
                           f"{meta.get('version', 'unknown')})")
    tta = upgraded(meta).get("tta")
    views = tta.get("views") if isinstance(tta, dict) else None
    if not isinstance(views, list) or not all(_is_view_record(v) for v in views) or len(views) != tta.get("n"):
        raise StackerError(f"{source}: records no readable tta views (tta {tta}): {len(VIEW_KEYS)} keys "
                           f"{', '.join(VIEW_KEYS)} per view, tta.n of them; run predict-oof again")
    return [View(v["flip"], float(v["zoom"]), float(v["cx"]), float(v["cy"])) for v in views]


def _is_view_record(record) -> bool:
    """{flip: bool, zoom, cx, cy: numbers}, nothing else."""
    if not isinstance(record, dict) or set(record) != set(VIEW_KEYS) or not isinstance(record["flip"], bool):
        return False
    return all(isinstance(record[k], Real) and not isinstance(record[k], bool) for k in VIEW_KEYS[1:])


def fold_table_meta(meta: dict, repeat: int, fold: int, **fields) -> dict:
    """What fold model (repeat, fold)'s tables record: a model's record, which fold model it is (`repeat`
    only past repeat 0) and `fields` in place of the model's own (a fold table's folds and weights digests).
    """
    out = {**meta, "fold": fold, **fields}
    return {**out, "repeat": repeat} if repeat else out
