"""What a run report shows, read from the catalog: the read model behind ``styletag report RUN``
(``worker.ops.report`` renders it as one HTML page, or JSON).

The counts are the run's own counters (``catalog.runs``: written, held for review, skipped, failed, and the
failures by reason in ``run_failure_counts``), counted when the run wrote them: exact whatever later runs
did to the same products. The charts, distributions and examples read the products whose last run this
one still is. The queries aggregate in the database (one row per reason, per label, per written batch), so a
report of a run over millions of products stays small. :func:`truth_accuracy` is the same yardstick for the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import aliased

from catalog.db import session_scope
from catalog.review import queue_size
from catalog.runs import failure_counts, get_run, run_as_dict
from catalog.schema import LabelParent, ModelVersion, Product, ProductStyle, StyleLabel, StyleTruth, TagState

MAX_BUCKETS = 60
NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


@dataclass
class Example:
    sku: str
    title: str
    uri: str
    score: float
    coarse: str
    coarse_score: float | None
    least_confident: bool = False


@dataclass
class ReportData:
    run: dict
    taxonomy: str | None
    counts: dict[str, int]
    bucket_s: int = 1
    series: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds since start, tagged, failed)
    span_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    coarse: list[dict] = field(default_factory=list)  # {name, count, mean_score}
    fine: list[dict] = field(default_factory=list)  # {name, parent, count, mean_score}
    examples: dict[str, list[Example]] = field(default_factory=dict)
    agreement: dict[str, tuple[int, int]] = field(default_factory=dict)  # level -> (matches, with truth)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _bucket_width(span_s: float) -> int:
    return next((w for w in NICE_BUCKETS if span_s / w <= MAX_BUCKETS), NICE_BUCKETS[-1])


def collect(database_url: str, run_id: int, *, examples: int = 6, least: int = 2, failure_examples: int = 5
            ) -> ReportData:
    """Everything the page shows, read in one session."""
    in_run = TagState.run_id == run_id
    with session_scope(database_url) as s:
        run = get_run(s, run_id)
        info = run_as_dict(run)
        data = ReportData(run=info, taxonomy=s.scalar(select(ModelVersion.taxonomy).where(
            ModelVersion.version == run.model_version)), counts={
            "total": info["total"], "written": info["done"], "tagged": info["done"], "review": info["review"],
            "skipped": info["skipped"], "failed": info["failed"], "remaining": info["remaining"],
            "review_queue": queue_size(s)})

        # Throughput: a batch's rows share one updated_at, so this is one row per written batch.
        stamps = s.execute(select(TagState.updated_at, TagState.status, func.count()).where(in_run)
                           .group_by(TagState.updated_at, TagState.status)).all()
        if stamps:
            start = _utc(run.created_at)
            points = [(max(0.0, (_utc(t) - start).total_seconds()), st, n) for t, st, n in stamps]
            data.span_s = max(p[0] for p in points)
            data.bucket_s = _bucket_width(data.span_s)
            buckets: dict[int, list[int]] = {}
            for offset, status, n in points:
                b = buckets.setdefault(int(offset // data.bucket_s), [0, 0])
                b[1 if status == "failed" else 0] += n
            last = max(buckets)
            data.series = [(i * data.bucket_s, *buckets.get(i, [0, 0])) for i in range(last + 1)]

        # Failures by reason (as the run counted them), with the first few SKUs of each still failed in it.
        reasons = list(failure_counts(s, run_id).items())
        rn = func.row_number().over(partition_by=TagState.reason, order_by=TagState.product_id).label("rn")
        ranked = (select(TagState.reason, TagState.error, Product.sku, rn)
                  .join(Product, Product.id == TagState.product_id)
                  .where(in_run, TagState.status == "failed").subquery())
        samples: dict[str | None, list[dict]] = {}
        for reason, error, sku, _ in s.execute(select(ranked).where(ranked.c.rn <= failure_examples)
                                               .order_by(ranked.c.reason, ranked.c.rn)):
            samples.setdefault(reason, []).append({"sku": sku, "error": (error or "")[:300]})
        data.failures = [{"reason": r or "unknown", "count": n, "examples": samples.get(r, [])} for r, n in reasons]

        # Distribution of primary styles, every label of the taxonomy (zeros included).
        labels = list(s.scalars(select(StyleLabel).where(StyleLabel.taxonomy == data.taxonomy)
                                .order_by(StyleLabel.level, StyleLabel.position))) if data.taxonomy else []
        tagged_primary = and_(TagState.product_id == ProductStyle.product_id, in_run,
                              TagState.status.in_(("tagged", "review")), ProductStyle.is_primary,
                              ProductStyle.source == "model")
        dist = {lid: (n, mean) for lid, n, mean in s.execute(
            select(ProductStyle.label_id, func.count(), func.avg(ProductStyle.score))
            .join(TagState, tagged_primary).group_by(ProductStyle.label_id))}
        names = {lb.id: lb for lb in labels}
        parents: dict[int, list[str]] = {}
        for label_id, parent_id in s.execute(select(LabelParent.label_id, LabelParent.parent_id)
                                             .where(LabelParent.label_id.in_(list(names)))):
            if parent_id in names:
                parents.setdefault(label_id, []).append(names[parent_id].name)
        for lb in labels:
            n, mean = dist.get(lb.id, (0, None))
            row = {"name": lb.name, "count": n, "mean_score": None if mean is None else float(mean)}
            if lb.level == "coarse":
                data.coarse.append(row)
            else:
                data.fine.append({**row, "parent": ", ".join(sorted(parents.get(lb.id, [])))})

        # Examples per fine style: the most and the least confident primary tags.
        fine_ids = [lb.id for lb in labels if lb.level == "fine"]
        top = func.row_number().over(partition_by=ProductStyle.label_id,
                                     order_by=(ProductStyle.score.desc(), ProductStyle.product_id)).label("top")
        low = func.row_number().over(partition_by=ProductStyle.label_id,
                                     order_by=(ProductStyle.score.asc(), ProductStyle.product_id)).label("low")
        ranked = (select(ProductStyle.product_id, ProductStyle.label_id, ProductStyle.score, top, low)
                  .join(TagState, tagged_primary).where(ProductStyle.label_id.in_(fine_ids)).subquery())
        rows = s.execute(select(ranked, Product.sku, Product.title, Product.image_uri)
                         .join(Product, Product.id == ranked.c.product_id)
                         .where((ranked.c.top <= examples) | (ranked.c.low <= least))
                         .order_by(ranked.c.label_id, ranked.c.top)).all() if fine_ids else []
        coarse_of = {pid: (names[lid].name, score) for pid, lid, score in s.execute(
            select(ProductStyle.product_id, ProductStyle.label_id, ProductStyle.score)
            .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
            .where(ProductStyle.product_id.in_([r.product_id for r in rows]), ProductStyle.is_primary,
                   StyleLabel.level == "coarse"))} if rows else {}
        for r in rows:
            coarse, cscore = coarse_of.get(r.product_id, ("", None))
            data.examples.setdefault(names[r.label_id].name, []).append(Example(
                r.sku, r.title, r.image_uri, float(r.score), coarse, cscore,
                least_confident=r.top > examples))

        # Agreement with human-verified labels (style_truth), per level.
        truth_level = (select(StyleLabel.level, func.count(func.distinct(StyleTruth.product_id)))
                       .select_from(TagState).join(StyleTruth, StyleTruth.product_id == TagState.product_id)
                       .join(StyleLabel, StyleLabel.id == StyleTruth.label_id)
                       .where(in_run, TagState.status == "tagged").group_by(StyleLabel.level))
        matches = dict(s.execute(
            select(StyleLabel.level, func.count(func.distinct(ProductStyle.product_id)))
            .join(TagState, tagged_primary).join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
            .join(StyleTruth, and_(StyleTruth.product_id == ProductStyle.product_id,
                                   StyleTruth.label_id == ProductStyle.label_id))
            .group_by(StyleLabel.level)).all())
        data.agreement = {level: (matches.get(level, 0), n) for level, n in s.execute(truth_level).all()}
    return data


def truth_accuracy(database_url: str, run_id: int) -> dict[str, dict[str, float]]:
    """Share of the run's products whose primary tag at each level equals the human label."""
    out = {}
    with session_scope(database_url) as session:
        for level in ("coarse", "fine"):
            pl, tl = aliased(StyleLabel), aliased(StyleLabel)
            q = (
                select(func.count(), func.sum(func.cast(pl.id == tl.id, type_=ProductStyle.score.type)))
                .select_from(TagState)
                .join(ProductStyle, and_(ProductStyle.product_id == TagState.product_id, ProductStyle.is_primary))
                .join(pl, and_(pl.id == ProductStyle.label_id, pl.level == level))
                .join(StyleTruth, StyleTruth.product_id == TagState.product_id)
                .join(tl, and_(tl.id == StyleTruth.label_id, tl.level == level))
                .where(TagState.run_id == run_id, TagState.status == "tagged")
            )
            n, correct = session.execute(q).one()
            out[level] = {"products": int(n or 0), "accuracy": float(correct or 0) / n if n else 0.0}
    return out
