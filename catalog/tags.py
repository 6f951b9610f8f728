"""Writing a batch of predictions (and failures) into the catalog, idempotently.

The worker calls :func:`write_batch` once per batch inside its one transaction. The promises:

* **Activation decides.** A write is accepted only from the taxonomy's *active* model (``catalog.models``)
  and, for a run, only while the run is enqueuing or running and only with the run's own model. Anything
  else (a straggler on the old model, a redelivered message of a superseded or finished run) is ignored
  and counts nowhere (``WriteOutcome.stale``). So after ``model rollback`` + ``retag --changed-only`` every
  product carries the older model's tags again: training time plays no part.
* **People win.** ``manual`` rows (``catalog.overrides``) are never deleted or overwritten. At a level where
  a person set a tag, the model's rows are still written (so clearing the override shows them at once) but
  unpublished; a model row for the very label a person set is skipped (the manual row holds that key).
* **Review.** A prediction the pipeline flags (``ProductTags.review_reason``: under the checkpoint's review
  threshold, or out of distribution) is written with tag_state status ``review`` and unpublished rows,
  unless a person already confirmed its primary labels (``style_truth`` from an accepted review or an
  override, or a manual tag at that level).
* **Idempotent, exact counters.** Writing the same batch twice (a redelivered Celery message) leaves the
  same rows and the same run counters: a product counts toward the run's ``done`` (``review`` among them),
  ``failed`` (and ``run_failure_counts``) or ``skipped`` (archived or deleted since it was enqueued) only
  when it first reaches that state in that run. ``tag_state.run_id`` is the last *run* that reached the
  product: a write outside any run (uploads) keeps it.
* **Non-destructive failures.** A failed fetch or decode records why in tag_state and keeps the product's
  previous tags; the storefront keeps showing the last good answer. (A product held for review stays held:
  its failure is counted and its error recorded, its status stays ``review``.)

Concurrent writers lock the products rows in id order (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's
``BEGIN IMMEDIATE`` already serialises writers), so they never deadlock. A run's write re-checks the run
when it counts (the counter update's WHERE, under the run row's lock): an activation that cancelled the
run meanwhile raises :class:`StaleWrite`, and the caller's rollback undoes the whole write. An upload's write reads its
model's row ``FOR SHARE`` before writing, so an activation waits for it or it sees the activation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from catalog.db import dialect_insert
from catalog.errors import FAILURE_REASONS, NotFound, StyletagError
from catalog.publishing import published, published_changed
from catalog.runs import UNFINISHED, count_outcomes
from catalog.schema import ModelVersion, Product, ProductStyle, StyleLabel, StyleTruth, TaggingRun, TagState

# style_truth sources that mean "a person confirmed this label" (catalog.review, catalog.overrides)
CONFIRMED_SOURCES = ("review", "manual")
REVIEW_REASONS = ("low_confidence", "out_of_distribution")


class StaleWrite(StyletagError):
    """A run's write found, at its end, that the run was cancelled (superseded) or finished after it began:
    the caller rolls the transaction back (``session_scope`` does) and counts the batch as ``stale``. (A
    savepoint would avoid the rollback, but on PostgreSQL every tuple the batch wrote then carries a
    subtransaction id, and the statements after it slowed down 4x: measured with bench.stages.write_rate.)"""

    def __init__(self, run_id: int, products: int):
        super().__init__(f"run {run_id} was cancelled or finished while {products} of its products were written; "
                         "nothing was written")
        self.run_id, self.products = run_id, products


@dataclass(frozen=True)
class Tag:
    label_id: int
    score: float
    is_primary: bool = False


@dataclass(frozen=True)
class ProductTags:
    product_id: int
    image_version: str | None
    tags: list[Tag] = field(default_factory=list)
    # the score the review rule was held against (calibrated; higher = surer), and why to hold it, if so
    confidence: float | None = None
    review_reason: str | None = None  # one of REVIEW_REASONS, or None


@dataclass(frozen=True)
class ProductFailure:
    product_id: int
    image_version: str | None
    reason: str  # one of catalog.errors.FAILURE_REASONS (catalog.errors.failure_reason of the error)
    error: str  # the one-line message of the typed error


@dataclass(frozen=True)
class WriteOutcome:
    tagged: int = 0  # products whose tags were (re)written, review included
    failed: int = 0  # products whose failure was recorded
    review: int = 0  # of ``tagged``: held for review
    skipped: int = 0  # products of the batch not written: archived or deleted since they were enqueued
    stale: int = 0  # products ignored: the model is not active, or the run is finished, cancelled or another's


def _score(value: float, product_id: int) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"NaN score for product {product_id}")
    return min(1.0, max(0.0, value))  # float noise like 1.0000001 must not violate the CHECK


def model_row(session: Session, model_version: str):
    row = session.execute(select(ModelVersion.taxonomy, ModelVersion.status)
                          .where(ModelVersion.version == model_version)).first()
    if row is None:
        raise NotFound(f"model version {model_version!r} is not registered; call register_model first")
    return row


def accepts(session: Session, run_id: int | None, model_version: str, *, shadow: bool = False) -> bool:
    """Whether a write of ``model_version`` for ``run_id`` would be accepted now (no lock; the writer
    checks again under locks). Shadow runs accept any registered model that is not retired."""
    model = model_row(session, model_version)
    if run_id is None:
        return not shadow and model.status == "active"
    run = session.execute(select(TaggingRun.status, TaggingRun.model_version, TaggingRun.kind)
                          .where(TaggingRun.id == run_id)).first()
    if run is None or run.status not in UNFINISHED or run.model_version != model_version:
        return False
    if shadow:
        return run.kind == "shadow" and model.status != "retired"
    return run.kind != "shadow" and model.status == "active"


def write_batch(
    session: Session,
    *,
    run_id: int | None,
    model_version: str,
    tagged: list[ProductTags],
    failed: list[ProductFailure],
) -> WriteOutcome:
    """Write one batch in the caller's transaction (the caller commits). See the module docstring."""
    by_id: dict[int, ProductTags | ProductFailure] = {f.product_id: f for f in failed}
    by_id.update({t.product_id: t for t in tagged})  # a product both tagged and failed counts as tagged
    if not by_id:
        model_row(session, model_version)
        return WriteOutcome()
    ids = sorted(by_id)
    if not accepts(session, run_id, model_version):
        return WriteOutcome(stale=len(ids))
    dialect = session.get_bind().dialect.name

    # Lock the products rows (id order, so concurrent writers never deadlock), THEN read tag_state in
    # a second statement: under READ COMMITTED that statement takes a fresh snapshot which includes
    # whatever the writer we waited for committed. (Read in the locking statement, the joined
    # tag_state rows would be from before the wait, and a redelivered batch would be counted twice.)
    if dialect == "postgresql":
        arr = _pg_array(ids)
        locked = session.execute(_PG_LOCK_PRODUCTS, {"ids": arr}).all()
    else:  # SQLite: BEGIN IMMEDIATE already holds the database's write lock
        locked = session.execute(select(Product.id, Product.archived_at.is_not(None))
                                 .where(Product.id.in_(ids))).all()
    archived = {pid for pid, is_archived in locked if is_archived}
    present = {pid for pid, _ in locked}
    if run_id is None and present:
        # An upload: hold the model's row until commit, so an activation waits for this write or this
        # write sees it (then nothing is written: the worker retags with the new model).
        status = session.execute(select(ModelVersion.status).where(ModelVersion.version == model_version)
                                 .with_for_update(read=True)).scalar()
        if status != "active":
            return WriteOutcome(stale=len(ids))
    if dialect == "postgresql":
        prior_rows = session.execute(_PG_PRIOR_STATE, {"ids": arr}).all()
        manual_rows = session.execute(_PG_MANUAL, {"ids": arr}).all()
    else:
        prior_rows = session.execute(
            select(TagState.product_id, TagState.status, TagState.run_id, TagState.model_version,
                   TagState.image_version, TagState.reason)
            .where(TagState.product_id.in_(ids))
        ).all()
        manual_rows = session.execute(
            select(ProductStyle.product_id, StyleLabel.level, ProductStyle.label_id)
            .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
            .where(ProductStyle.product_id.in_(ids), ProductStyle.source == "manual")
        ).all()
    prior = {r.product_id: r for r in prior_rows}
    manual_levels: dict[int, set[str]] = {}
    for pid, level, _ in manual_rows:
        manual_levels.setdefault(pid, set()).add(level)
    label_ids = {t.label_id for item in by_id.values() if isinstance(item, ProductTags) for t in item.tags}
    level_of = dict(session.execute(select(StyleLabel.id, StyleLabel.level)
                                    .where(StyleLabel.id.in_(sorted(label_ids)))).all()) if label_ids else {}
    flagged = [pid for pid, item in by_id.items() if isinstance(item, ProductTags) and item.review_reason]
    confirmed: dict[int, set[int]] = {}
    if flagged:
        for pid, label_id in session.execute(select(StyleTruth.product_id, StyleTruth.label_id).where(
                StyleTruth.product_id.in_(flagged), StyleTruth.source.in_(CONFIRMED_SOURCES))):
            confirmed.setdefault(pid, set()).add(label_id)

    now = datetime.now(UTC)
    styles: list[tuple[int, int, float, bool, bool]] = []  # (product_id, label_id, score, is_primary, published)
    states: list[tuple] = []  # (pid, image_version, status, reason, error, confidence)
    rewrite_ids: list[int] = []
    claim_ids: list[int] = []  # counted by this run without a new state: only tag_state.run_id moves
    kept_review: list[tuple[int, str]] = []  # failures of products held for review: (pid, error)
    done = failed_n = skipped = review_n = 0
    failures: Counter[str] = Counter()
    for pid in ids:
        item = by_id[pid]
        before = prior.get(pid)
        same_run = run_id is not None and before is not None and before.run_id == run_id
        if pid not in present or pid in archived:  # gone or archived since it was enqueued: not written
            if run_id is not None and not same_run:
                skipped += 1
                if before is not None:
                    claim_ids.append(pid)  # count it once, whatever redelivery brings
            continue
        is_tag = isinstance(item, ProductTags)
        written_before = before is not None and before.status in ("tagged", "review")
        if not is_tag and same_run and written_before:
            continue  # already written in this run: a later (redelivered) failure must not undo it
        if (is_tag and same_run and written_before and before.model_version == model_version
                and before.image_version == item.image_version):
            continue  # this run already wrote these tags (a redelivered message): write nothing twice
        if not is_tag:
            reason = item.reason if item.reason in FAILURE_REASONS else "error"
            if run_id is not None:
                if not same_run:
                    failed_n += 1
                    failures[reason] += 1
                elif before.status == "failed" and before.reason != reason:
                    failures[before.reason or "error"] -= 1  # the run's failure moves to its new reason
                    failures[reason] += 1
            if before is not None and before.status == "review":
                kept_review.append((pid, (item.error or "")[:2000]))  # held tags stay held
                if run_id is not None and not same_run:
                    claim_ids.append(pid)
                continue
            states.append((pid, item.image_version, "failed", reason, (item.error or "")[:2000], None))
            continue
        manual_here = manual_levels.get(pid, set())
        primary = [t for t in item.tags if t.is_primary]
        is_confirmed = bool(primary) and all(
            level_of.get(t.label_id) in manual_here or t.label_id in confirmed.get(pid, ()) for t in primary)
        hold = bool(item.review_reason) and not is_confirmed
        if run_id is not None:
            if not same_run:
                done += 1
                review_n += hold
            elif before.status == "failed":
                done += 1
                failed_n -= 1
                failures[before.reason or "error"] -= 1
                review_n += hold
            else:  # rewritten in the same run (its image changed): the review count follows
                review_n += hold - (before.status == "review")
        rewrite_ids.append(pid)
        per_label = {t.label_id: t for t in item.tags}  # a label twice would violate the primary key
        for t in per_label.values():
            pub = published(source="model", archived=False, in_review=hold,
                            manual_at_level=level_of.get(t.label_id) in manual_here)
            styles.append((pid, t.label_id, _score(t.score, pid), bool(t.is_primary), pub))
        confidence = None if item.confidence is None else _score(item.confidence, pid)
        states.append((pid, item.image_version, "review" if hold else "tagged",
                       (item.review_reason if item.review_reason in REVIEW_REASONS else "low_confidence")
                       if hold else None, None, confidence))

    common = {"mv": model_version, "run_id": run_id, "now": now}
    if dialect == "postgresql":
        _write_pg(session, rewrite_ids, styles, states, common)
    else:
        _write_generic(session, rewrite_ids, styles, states, common)
    ts = TagState.__table__
    if claim_ids:
        session.execute(update(ts).where(ts.c.product_id.in_(claim_ids)).values(run_id=run_id))
    for pid, error in kept_review:
        session.execute(update(ts).where(ts.c.product_id == pid)
                        .values(error=error, attempts=ts.c.attempts + 1, updated_at=now))
    if run_id is not None and not count_outcomes(session, run_id, done=done, failed=failed_n, skipped=skipped,
                                                 review=review_n, failures=dict(failures), model_version=model_version):
        # The run was cancelled (superseded) or finished after the first check: the caller must roll back.
        raise StaleWrite(run_id, len(ids))
    if rewrite_ids:
        published_changed(session, rewrite_ids)  # last: derived counts (catalog.facets) follow
    n_review = sum(1 for s in states if s[2] == "review")
    n_tagged = len(rewrite_ids)
    return WriteOutcome(tagged=n_tagged, failed=len(states) - n_tagged + len(kept_review), review=n_review,
                        skipped=len(ids) - len(present - archived), stale=0)


# PostgreSQL: one statement per table with array parameters (unnest) instead of a round trip per row;
# the statements are constant, so the server prepares them once per connection. product_styles is
# upserted and then the product's model rows this statement did not touch (older tagged_at) are deleted:
# re-tagging an already tagged product then updates rows in place, which skips the foreign-key
# checks that DELETE + INSERT would run again for every row. A manual row is never updated (the
# upsert's WHERE) nor deleted.
_PG_UPSERT_STYLES = text(
    "INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, tagged_at, source, "
    "published) "
    "SELECT u.pid, u.lid, u.score, u.prim, :mv, :now, 'model', u.pub FROM unnest("
    "CAST(:pids AS BIGINT[]), CAST(:lids AS BIGINT[]), CAST(:scores AS DOUBLE PRECISION[]), "
    "CAST(:prims AS BOOLEAN[]), CAST(:pubs AS BOOLEAN[])) AS u(pid, lid, score, prim, pub) "
    "ON CONFLICT (product_id, label_id) DO UPDATE SET score = excluded.score, is_primary = excluded.is_primary, "
    "model_version = excluded.model_version, tagged_at = excluded.tagged_at, published = excluded.published "
    "WHERE product_styles.source = 'model'"
)
# ``= ANY`` here, not a join with unnest: with the source condition the planner (after an ANALYZE in the middle
# of a retag) chose a nested loop of the whole table against the id list, 300 ms per batch of 256 instead of
# 5 (bench.stages.write_rate); ``= ANY`` is an index condition on the primary key's first column.
_PG_DELETE_STALE_STYLES = text(
    "DELETE FROM product_styles s WHERE s.product_id = ANY(CAST(:ids AS BIGINT[])) AND s.tagged_at <> :now "
    "AND s.source = 'model'"
)
# Lookups join unnest(ids) rather than ``id = ANY(ids)``: should the planner misjudge a table's size
# (fresh statistics after a bulk load), the worst case is one hash join, not a scan of the table that
# compares every row with every id of the batch.
_PG_LOCK_PRODUCTS = text(
    "SELECT p.id, p.archived_at IS NOT NULL FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) "
    "JOIN products p ON p.id = u.id ORDER BY p.id FOR UPDATE OF p"
)
_PG_PRIOR_STATE = text(
    "SELECT t.product_id, t.status, t.run_id, t.model_version, t.image_version, t.reason "
    "FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) JOIN tag_state t ON t.product_id = u.id"
)
_PG_MANUAL = text(
    "SELECT s.product_id, l.level, s.label_id FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) "
    "JOIN product_styles s ON s.product_id = u.id AND s.source = 'manual' JOIN style_labels l ON l.id = s.label_id"
)
_PG_UPSERT_STATE = text(
    "INSERT INTO tag_state (product_id, model_version, image_version, status, reason, error, confidence, "
    "attempts, run_id, updated_at) "
    "SELECT u.pid, :mv, u.iv, u.st, u.reason, u.err, u.conf, 1, :run_id, :now FROM unnest("
    "CAST(:pids AS BIGINT[]), CAST(:ivs AS TEXT[]), CAST(:sts AS TEXT[]), CAST(:reasons AS TEXT[]), "
    "CAST(:errs AS TEXT[]), CAST(:confs AS DOUBLE PRECISION[])) AS u(pid, iv, st, reason, err, conf) "
    "ON CONFLICT (product_id) DO UPDATE SET model_version = excluded.model_version, "
    "image_version = excluded.image_version, status = excluded.status, reason = excluded.reason, "
    "error = excluded.error, confidence = excluded.confidence, "
    "run_id = COALESCE(excluded.run_id, tag_state.run_id), attempts = tag_state.attempts + 1, "
    "updated_at = excluded.updated_at"
)


def _pg_array(values) -> str:
    """A PostgreSQL array literal of numbers/booleans: much cheaper than the driver's generic list
    adaptation, which dominated the client's time (floats use repr, which round-trips exactly)."""
    return "{" + ",".join(map(repr, values)) + "}"


def _write_pg(session: Session, rewrite_ids: list[int], styles: list[tuple], states: list[tuple], common: dict) -> None:
    if styles:
        pids, lids, scores, prims, pubs = zip(*styles, strict=True)
        session.execute(
            _PG_UPSERT_STYLES,
            {"pids": _pg_array(pids), "lids": _pg_array(lids), "scores": _pg_array(scores),
             "prims": _pg_array(prims), "pubs": _pg_array(pubs), **common},
        )
    if rewrite_ids:
        session.execute(_PG_DELETE_STALE_STYLES, {"ids": _pg_array(rewrite_ids), "now": common["now"]})
    if states:
        pids, ivs, sts, reasons, errs, confs = (list(c) for c in zip(*states, strict=True))
        session.execute(
            _PG_UPSERT_STATE,
            {"pids": _pg_array(pids), "ivs": ivs, "sts": sts, "reasons": reasons, "errs": errs, "confs": confs,
             **common},
        )


def _write_generic(
    session: Session, rewrite_ids: list[int], styles: list[tuple], states: list[tuple], common: dict
) -> None:
    """SQLite (and any dialect with ON CONFLICT): the driver's executemany is already fast there."""
    mv, run_id, now = common["mv"], common["run_id"], common["now"]
    if rewrite_ids:
        table = ProductStyle.__table__
        session.execute(delete(table).where(table.c.product_id.in_(rewrite_ids), table.c.source == "model"))
    if styles:
        session.execute(
            dialect_insert(session, ProductStyle).on_conflict_do_nothing(),  # a manual row keeps its key
            [{"product_id": p, "label_id": lid, "score": sc, "is_primary": pr, "model_version": mv, "tagged_at": now,
              "source": "model", "published": pub}
             for p, lid, sc, pr, pub in styles],
        )
    if states:
        ins = dialect_insert(session, TagState)
        session.execute(
            ins.on_conflict_do_update(
                index_elements=["product_id"],
                set_={
                    "model_version": ins.excluded.model_version,
                    "image_version": ins.excluded.image_version,
                    "status": ins.excluded.status,
                    "reason": ins.excluded.reason,
                    "error": ins.excluded.error,
                    "confidence": ins.excluded.confidence,
                    "run_id": func.coalesce(ins.excluded.run_id, TagState.__table__.c.run_id),
                    "attempts": TagState.__table__.c.attempts + 1,
                    "updated_at": ins.excluded.updated_at,
                },
            ),
            [{"product_id": p, "model_version": mv, "image_version": iv, "status": st, "reason": rs, "error": er,
              "confidence": cf, "run_id": run_id, "attempts": 1, "updated_at": now}
             for p, iv, st, rs, er, cf in states],
        )
