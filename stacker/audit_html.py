"""The audit as HTML: a section of report.html and `stacker audit`'s own page (audit/audit.html).

Thumbnails come from the run's cache (`stacker.thumbnails`), embedded as data URIs within the
page's budget (200 images, 2 MB); a run without a cache (tables from other tools) gets the same
sections as text tables. The CSVs under audit/ hold every row; the page shows the first ones.
"""
from __future__ import annotations

import os

from oof import write_text

from .audit import Audit, audit_view
from .html_parts import esc, fmt, html_page, table
from .leaderboard import read_run
from .thumbnails import Thumbnails

# Thumbnails per section, 196 of the page's 200: top losses, label issues, pairs x examples, clusters x images.
SHOWN = {"top_losses": 40, "label_issues": 40, "pairs": 8, "per_pair": 4, "clusters": 14, "per_cluster": 6}
TEXT_ROWS = 20  # rows of a section's table without thumbnails


def thumb(thumbs: Thumbnails, split: str, image_id, caption: list[str]) -> str:
    """One image with its caption lines; the caption alone when the image is not shown."""
    uri = thumbs.uri(split, image_id)
    img = f'<img alt="{esc(image_id)}" src="{uri}">' if uri else ""
    return f'<figure class="thumb">{img}<figcaption>{"<br>".join(esc(c) for c in caption)}</figcaption></figure>'


def grid(cells: list[str]) -> str:
    return f'<div class="thumbs">{"".join(cells)}</div>'


def ranked_html(frame, thumbs: Thumbnails, text: str, shown: int, second: str) -> str:
    """A ranked table's first rows as thumbnails captioned id, given / other label (`second`: the frame's
    column of the predicted or suggested label), its score, models agreeing; as a text table without a cache."""
    if not len(frame):
        return text
    score = "p_predicted" if second == "predicted" else "quality"
    if not thumbs.available:
        rows = frame.head(TEXT_ROWS)[["id", "label", second, score, "models_agree"]]
        return text + table(list(rows.columns), rows.values.tolist())
    cells = [thumb(thumbs, "train", r.id, [r.id, f"{r.label} / {getattr(r, second)}",
                                          f"{score.split('_')[0]} {getattr(r, score):.2g}",
                                          f"{r.models_agree}/{r.models} models agree"])
             for r in frame.head(shown).itertuples()]
    return text + grid(cells)


def top_losses_html(audit: Audit, thumbs: Thumbnails) -> str:
    frame = audit.top_losses
    text = (f"<h3>Top losses</h3><p class=note>{len(frame)} of {len(audit.rows.y)} train rows are wrong out of "
            "fold; the highest loss first (the lowest probability of the given label): given label / predicted, "
            "the ensemble's probability of its prediction, models agreeing with it. Every row: "
            "audit/top_losses.csv.</p>")
    return ranked_html(frame, thumbs, text, SHOWN["top_losses"], "predicted")


def confused_html(audit: Audit, thumbs: Thumbnails) -> str:
    pairs = audit.confused
    text = ("<h3>Most confused</h3><p class=note>(given, predicted) class pairs by count, with the ensemble's "
            "most confident examples.</p>")
    if not pairs:
        return text + "<p>No train row is wrong out of fold.</p>"
    text += table(["given", "predicted", "rows"], [[c.actual, c.predicted, c.count] for c in pairs[:TEXT_ROWS // 2]])
    if not thumbs.available:
        return text
    ids = audit.rows.ids
    for c in pairs[:SHOWN["pairs"]]:
        cells = [thumb(thumbs, "train", ids[r], [str(ids[r]), f"p {fmt(audit.rows.ensemble[r].max(), 2)}"])
                 for r in c.rows[:SHOWN["per_pair"]]]
        text += f"<p>{esc(c.actual)} taken for {esc(c.predicted)}: {c.count}</p>" + grid(cells)
    return text


def label_issues_html(audit: Audit, thumbs: Thumbnails) -> str:
    frame = audit.label_issues
    above = frame["id"].isin(thumbs.shown)  # pictured in a section above already: not drawn twice
    text = (f"<h3>Likely label errors</h3><p class=note>{len(frame)} rows flagged by confident learning "
            "(cleanlab's find_label_issues on the ensemble's OOF), lowest label quality first (cleanlab's "
            "ensemble of every model's self-confidence): given label / suggested"
            + (f"; {int(above.sum())} of them are pictured above and not again here" if above.any()
               else "") + ". Every row: audit/label_issues.csv (copied out of audit/, a data.exclude list; a "
            "relabel file is a CSV of id, label).</p>")
    return ranked_html(frame[~above], thumbs, text, SHOWN["label_issues"], "suggested")


def duplicates_html(audit: Audit, thumbs: Thumbnails) -> str:
    frame = audit.duplicates
    text = "<h3>Duplicates</h3>"
    if not audit.has_duplicates_file:
        return text + "<p class=note>The run lists no near-duplicates (duplicates.csv: folds.duplicates off, or " \
                      "tables from other tools).</p>"
    clusters = frame.groupby("cluster", sort=True)
    kinds = frame.drop_duplicates("cluster")["kind"].value_counts()
    text += (f"<p class=note>{frame['cluster'].nunique()} clusters of near-duplicate images from duplicates.csv "
             f"({', '.join(f'{n} {k}' for k, n in kinds.items()) or 'none'}): label conflicts first, then train "
             "images with a copy in test. Every image: audit/duplicates.csv.</p>")
    if not thumbs.available:
        rows = frame[frame["cluster"] <= TEXT_ROWS][["cluster", "kind", "id", "split", "label"]]
        return text + table(list(rows.columns), rows.values.tolist())
    for number, members in list(clusters)[:SHOWN["clusters"]]:
        cells = [thumb(thumbs, m.split, m.id, [m.id, f"{m.split} {m.label}".strip()])
                 for m in members.head(SHOWN["per_cluster"]).itertuples()]
        text += (f'<div class="cluster"><p>cluster {number}: {esc(members["kind"].iloc[0])}, {len(members)} '
                 "images</p>" + grid(cells) + "</div>")
    return text


def audit_section(audit: Audit, thumbs: Thumbnails) -> str:
    """The audit's HTML: its four parts, then how many thumbnails the page's budget left out."""
    body = (top_losses_html(audit, thumbs) + confused_html(audit, thumbs) + label_issues_html(audit, thumbs)
            + duplicates_html(audit, thumbs))
    where = "" if thumbs.available else " The run has no image cache (tables from other tools): text only."
    where += f" {esc(audit.edits)}." if audit.edits else ""
    budget = (f" {thumbs.left_out} more thumbnails were left out (the page shows at most {thumbs.max_count}, "
              f"{thumbs.max_bytes / 1e6:.0f} MB)." if thumbs.left_out else "")
    return (f"<h2>Audit: the data through the models</h2><p class=note>{esc(audit.summary())}. Ensemble: "
            f"{esc(audit.rows.ensemble_label)}.{where}{budget}</p>" + body)


def audit_page(audit: Audit, paths) -> str:
    """`stacker audit`'s page: the section alone, self-contained."""
    title = f"stacker audit: {paths.root.parent.name}/{paths.root.name}"
    return html_page(title, audit_section(audit, Thumbnails(paths)))


def run_audit(run_dir: str | os.PathLike) -> tuple[Audit, list]:
    """`stacker audit --run DIR`: the audit, its CSVs and its own page (audit/audit.html).

    Raises:
        StackerError: no folds, no OOF table, a table that does not match the folds.
    """
    view = read_run(run_dir)
    audit = audit_view(view)
    written = audit.write_tables(view.paths)
    write_text(view.paths.audit_page, audit_page(audit, view.paths))
    return audit, [*written, view.paths.audit_page]
