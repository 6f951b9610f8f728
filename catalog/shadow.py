"""Shadow predictions: a registered model's tags written beside the storefront's, and how they compare.

``styletag retag --shadow VERSION`` creates a run of kind ``shadow`` for a registered (not retired) model;
workers write its predictions with :func:`write_shadow_batch` into ``shadow_tags`` only: the storefront,
``tag_state`` and ``product_styles`` are never touched. Writes are idempotent (a product's shadow rows of
that model are replaced) and a product counts once per run (its rows carry the run's id).

:func:`compare` is ``styletag model compare VERSION``: per level, agreement of the shadow model's primary
tag with the current model tag of the same products, accuracy of both against ``style_truth`` where a
label exists, the flips (a confusion of current vs shadow label) and the shift in confidence.
"""

from __future__ import annotations

import html
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import and_, case, delete, func, select
from sqlalchemy.orm import Session, aliased

from catalog.db import dialect_insert
from catalog.errors import FAILURE_REASONS
from catalog.models import get_model
from catalog.runs import count_outcomes
from catalog.schema import Product, ProductStyle, ShadowTag, StyleLabel, StyleTruth
from catalog.tags import ProductFailure, ProductTags, StaleWrite, WriteOutcome, _score, accepts


def write_shadow_batch(session: Session, *, run_id: int, model_version: str, tagged: list[ProductTags],
                       failed: list[ProductFailure]) -> WriteOutcome:
    """Write a shadow run's batch (the caller commits). Stale (the run finished or cancelled, the model
    retired) writes nothing and counts nowhere. A failure is counted in the run unless the product already
    has this run's shadow rows; a product that failed twice (a redelivered failure) counts twice."""
    by_id: dict[int, ProductTags | ProductFailure] = {f.product_id: f for f in failed}
    by_id.update({t.product_id: t for t in tagged})
    if not by_id:
        return WriteOutcome()
    ids = sorted(by_id)
    if not accepts(session, run_id, model_version, shadow=True):
        return WriteOutcome(stale=len(ids))
    # Lock the products rows in id order (as the tag writer does): concurrent shadow writers of one product
    # then replace its rows one after the other.
    locked = session.execute(select(Product.id, Product.archived_at.is_not(None)).where(Product.id.in_(ids))
                             .order_by(Product.id).with_for_update(of=Product)).all()
    present = {pid for pid, archived in locked if not archived}
    counted = set(session.scalars(select(ShadowTag.product_id).distinct().where(
        ShadowTag.model_version == model_version, ShadowTag.run_id == run_id, ShadowTag.product_id.in_(ids))))
    now = datetime.now(UTC)
    rows, rewrite = [], []
    done = failed_n = skipped = 0
    failures: Counter[str] = Counter()
    for pid in ids:
        item = by_id[pid]
        if pid not in present:
            skipped += pid not in counted
            continue
        if isinstance(item, ProductFailure):
            if pid not in counted:
                failed_n += 1
                failures[item.reason if item.reason in FAILURE_REASONS else "error"] += 1
            continue
        done += pid not in counted
        rewrite.append(pid)
        per_label = {t.label_id: t for t in item.tags}
        rows += [{"model_version": model_version, "product_id": pid, "label_id": t.label_id,
                  "score": _score(t.score, pid), "is_primary": bool(t.is_primary), "run_id": run_id, "tagged_at": now}
                 for t in per_label.values()]
    if rewrite:
        session.execute(delete(ShadowTag).where(ShadowTag.model_version == model_version,
                                                ShadowTag.product_id.in_(rewrite)))
    if rows:
        session.execute(dialect_insert(session, ShadowTag).on_conflict_do_nothing(), rows)
    if not count_outcomes(session, run_id, done=done, failed=failed_n, skipped=skipped, failures=dict(failures),
                          model_version=model_version):
        raise StaleWrite(run_id, len(ids))  # finished or cancelled meanwhile: the caller rolls back
    return WriteOutcome(tagged=len(rewrite), failed=sum(isinstance(by_id[p], ProductFailure) for p in present),
                        skipped=len(ids) - len(present))


def compare(session: Session, version: str) -> dict:
    """The shadow model ``version`` against the current model tags (``product_styles`` rows of source
    ``model``, published or held), per level, on the products both have a primary tag for."""
    model = get_model(session, version)
    levels = [lv for (lv,) in session.execute(select(StyleLabel.level).distinct()
                                               .where(StyleLabel.taxonomy == model.taxonomy))]
    out = {"version": model.version, "taxonomy": model.taxonomy, "status": model.status,
           "shadow_products": int(session.scalar(select(func.count(func.distinct(ShadowTag.product_id)))
                                                 .where(ShadowTag.model_version == model.version)) or 0),
           "levels": {}}
    for level in sorted(levels, key=lambda lv: ("coarse", "fine", "colour").index(lv)
                        if lv in ("coarse", "fine", "colour") else 9):
        out["levels"][level] = _compare_level(session, model.version, model.taxonomy, level)
    return out


def _compare_level(session: Session, version: str, taxonomy: str, level: str) -> dict:
    nl, ol = aliased(StyleLabel), aliased(StyleLabel)
    new = (select(ShadowTag.product_id, ShadowTag.label_id, ShadowTag.score)
           .join(nl, and_(nl.id == ShadowTag.label_id, nl.level == level, nl.taxonomy == taxonomy))
           .where(ShadowTag.model_version == version, ShadowTag.is_primary).subquery("shadow_primary"))
    old = (select(ProductStyle.product_id, ProductStyle.label_id, ProductStyle.score)
           .join(ol, and_(ol.id == ProductStyle.label_id, ol.level == level, ol.taxonomy == taxonomy))
           .where(ProductStyle.source == "model", ProductStyle.is_primary).subquery("current_primary"))
    pairs = select(old.c.label_id.label("old_id"), new.c.label_id.label("new_id"), func.count().label("n"),
                   func.sum(old.c.score).label("old_score"), func.sum(new.c.score).label("new_score")) \
        .join(new, new.c.product_id == old.c.product_id).group_by(old.c.label_id, new.c.label_id)
    names = dict(session.execute(select(StyleLabel.id, StyleLabel.name).where(StyleLabel.taxonomy == taxonomy,
                                                                            StyleLabel.level == level)).all())
    compared = agree = 0
    old_sum = new_sum = 0.0
    flips = []
    for old_id, new_id, n, old_score, new_score in session.execute(pairs).all():
        compared += n
        old_sum += float(old_score or 0)
        new_sum += float(new_score or 0)
        if old_id == new_id:
            agree += n
        else:
            flips.append({"current": names.get(old_id, str(old_id)), "shadow": names.get(new_id, str(new_id)),
                          "products": int(n)})
    flips.sort(key=lambda f: (-f["products"], f["current"], f["shadow"]))
    # Accuracy against human labels, on the compared products that have one at this level.
    tl = aliased(StyleLabel)
    truth = (select(StyleTruth.product_id, StyleTruth.label_id)
             .join(tl, and_(tl.id == StyleTruth.label_id, tl.level == level, tl.taxonomy == taxonomy)).subquery("truth_at_level"))
    n_truth, old_ok, new_ok = session.execute(
        select(func.count(func.distinct(truth.c.product_id)),
               func.count(func.distinct(case((old.c.label_id == truth.c.label_id, truth.c.product_id)))),
               func.count(func.distinct(case((new.c.label_id == truth.c.label_id, truth.c.product_id)))))
        .select_from(old).join(new, new.c.product_id == old.c.product_id)
        .join(truth, truth.c.product_id == old.c.product_id)).one()
    n_truth = int(n_truth or 0)
    return {
        "compared": compared, "agree": agree, "agreement": round(agree / compared, 6) if compared else None,
        "flipped": compared - agree, "flips": flips,
        "with_truth": n_truth,
        "accuracy_current": round(old_ok / n_truth, 6) if n_truth else None,
        "accuracy_shadow": round(new_ok / n_truth, 6) if n_truth else None,
        "correct_current": int(old_ok or 0), "correct_shadow": int(new_ok or 0),
        "mean_confidence_current": round(old_sum / compared, 6) if compared else None,
        "mean_confidence_shadow": round(new_sum / compared, 6) if compared else None,
        "confidence_shift": round((new_sum - old_sum) / compared, 6) if compared else None,
    }


def compare_html(data: dict) -> str:
    """One self-contained page (inline CSS, no script, no external reference); every string escaped."""
    e = lambda v: html.escape("" if v is None else str(v), quote=True)  # noqa: E731
    pct = lambda v: "—" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
             f"<title>styletag model compare {e(data['version'])}</title><style>"
             "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2330}table{border-collapse:collapse}"
             "th,td{padding:4px 10px;border-bottom:1px solid #e6e8ee;text-align:left}td.n{text-align:right}"
             "</style></head><body>",
             f"<h1>Shadow model {e(data['version'])}</h1><p>taxonomy {e(data['taxonomy'])} · status "
             f"{e(data['status'])} · {data['shadow_products']:,} products with shadow predictions</p>"]
    for level, d in data["levels"].items():
        parts.append(f"<h2>{e(level)}</h2><table>"
                     f"<tr><th>compared products</th><td class=n>{d['compared']:,}</td></tr>"
                     f"<tr><th>agree with current tags</th><td class=n>{d['agree']:,} ({pct(d['agreement'])})</td></tr>"
                     f"<tr><th>with a human label</th><td class=n>{d['with_truth']:,}</td></tr>"
                     f"<tr><th>accuracy, current</th><td class=n>{pct(d['accuracy_current'])}</td></tr>"
                     f"<tr><th>accuracy, shadow</th><td class=n>{pct(d['accuracy_shadow'])}</td></tr>"
                     f"<tr><th>mean confidence, current → shadow</th><td class=n>{e(d['mean_confidence_current'])} → "
                     f"{e(d['mean_confidence_shadow'])}</td></tr></table>")
        if d["flips"]:
            parts.append("<h3>Flips (current → shadow)</h3><table><tr><th>current</th><th>shadow</th>"
                         "<th>products</th></tr>")
            parts += [f"<tr><td>{e(f['current'])}</td><td>{e(f['shadow'])}</td><td class=n>{f['products']:,}</td></tr>"
                      for f in d["flips"]]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
