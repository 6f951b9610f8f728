"""Writing a batch of predictions (and failures) into the catalog, idempotently.

The worker calls :func:`write_batch` once per batch inside its one transaction. Three promises:

* **Idempotent.** Writing the same batch twice (a redelivered Celery message) leaves the same rows
  and the same run counters: product_styles are replaced, tag_state is upserted, and a product counts
  toward ``tagging_runs.done``/``failed`` only when it first reaches a final state in that run. A
  product this run already tagged with the same model and image is not written again at all.
  ``tag_state.run_id`` is the last *run* that reached the product: a write outside any run (uploads)
  keeps it, so that a late redelivery of that run cannot count the product a second time.
* **Monotonic.** A product whose tags came from a model trained later than this one is skipped, so a
  straggling worker with an old checkpoint never regresses the catalog.
* **Non-destructive failures.** A failed fetch or decode records why in tag_state and keeps the
  product's previous tags; the storefront keeps showing the last good answer.

Concurrent writers lock the products rows in id order (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite's ``BEGIN IMMEDIATE`` already serialises writers), so they never deadlock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from catalog.db import dialect_insert
from catalog.errors import FAILURE_REASONS, NotFound
from catalog.runs import count_outcomes
from catalog.schema import ModelVersion, Product, ProductStyle, TagState


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


@dataclass(frozen=True)
class ProductFailure:
    product_id: int
    image_version: str | None
    reason: str  # one of catalog.errors.FAILURE_REASONS (catalog.errors.failure_reason of the error)
    error: str  # the one-line message of the typed error


@dataclass(frozen=True)
class WriteOutcome:
    tagged: int  # products whose tags were (re)written
    failed: int  # products whose failure was recorded
    skipped_newer: int  # products left alone because a later-trained model tagged them


def _score(value: float, product_id: int) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"NaN score for product {product_id}")
    return min(1.0, max(0.0, value))  # float noise like 1.0000001 must not violate the CHECK


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
        return WriteOutcome(0, 0, 0)
    ids = sorted(by_id)
    dialect = session.get_bind().dialect.name

    trained_at = session.execute(
        select(ModelVersion.trained_at).where(ModelVersion.version == model_version)
    ).scalar()
    if trained_at is None:
        raise NotFound(f"model version {model_version!r} is not registered; call register_model first")

    # Lock the products rows (id order, so concurrent writers never deadlock), THEN read tag_state in
    # a second statement: under READ COMMITTED that statement takes a fresh snapshot which includes
    # whatever the writer we waited for committed. (Read in the locking statement, the joined
    # tag_state rows would be from before the wait, and a redelivered batch would be counted twice.)
    if dialect == "postgresql":
        present = set(session.scalars(_PG_LOCK_PRODUCTS, {"ids": _pg_array(ids)}))
    else:  # SQLite: BEGIN IMMEDIATE already holds the database's write lock
        present = set(session.scalars(select(Product.id).where(Product.id.in_(ids))))
    if not present:
        return WriteOutcome(0, 0, 0)
    if dialect == "postgresql":
        prior_rows = session.execute(_PG_PRIOR_STATE, {"ids": _pg_array(ids)}).all()
    else:
        prior_rows = session.execute(
            select(TagState.product_id, TagState.status, TagState.run_id, TagState.model_version,
                   TagState.image_version, ModelVersion.trained_at)
            .outerjoin(ModelVersion, ModelVersion.version == TagState.model_version)
            .where(TagState.product_id.in_(ids))
        ).all()
    prior = {r.product_id: r for r in prior_rows}

    now = datetime.now(UTC)
    styles: list[tuple[int, int, float, bool]] = []  # (product_id, label_id, score, is_primary)
    states: list[tuple[int, str | None, str, str | None, str | None]] = []  # (pid, image_version, status, reason, error)
    rewrite_ids: list[int] = []
    claim_ids: list[int] = []  # kept newer tags: only tag_state.run_id moves to this run
    done_delta = failed_delta = skipped = 0
    for pid in ids:
        if pid not in present:  # deleted since the batch was enqueued: nothing to tag
            continue
        item = by_id[pid]
        before = prior.get(pid)
        same_run = run_id is not None and before is not None and before.run_id == run_id
        if before is not None and before.trained_at is not None and before.trained_at > trained_at:
            # A newer model's tags stay. The product still counts as handled (done) by this run, once,
            # so the run can finish and a resume does not send it again.
            skipped += 1
            if run_id is not None and not same_run:
                claim_ids.append(pid)
                done_delta += 1
            continue
        is_tag = isinstance(item, ProductTags)
        if not is_tag and same_run and before.status == "tagged":
            continue  # already tagged in this run: a later (redelivered) failure must not undo it
        if (is_tag and same_run and before.status == "tagged" and before.model_version == model_version
                and before.image_version == item.image_version):
            continue  # this run already wrote these tags (a redelivered message): write nothing twice
        if run_id is not None:
            if not same_run:
                done_delta += is_tag
                failed_delta += not is_tag
            elif is_tag and before.status == "failed":
                done_delta += 1
                failed_delta -= 1
        if is_tag:
            rewrite_ids.append(pid)
            per_label = {t.label_id: t for t in item.tags}  # a label twice would violate the primary key
            styles.extend((pid, t.label_id, _score(t.score, pid), bool(t.is_primary)) for t in per_label.values())
            states.append((pid, item.image_version, "tagged", None, None))
        else:
            reason = item.reason if item.reason in FAILURE_REASONS else "error"
            states.append((pid, item.image_version, "failed", reason, (item.error or "")[:2000]))

    common = {"mv": model_version, "run_id": run_id, "now": now}
    if dialect == "postgresql":
        _write_pg(session, rewrite_ids, styles, states, common)
    else:
        _write_generic(session, rewrite_ids, styles, states, common)
    if claim_ids:
        ts = TagState.__table__
        session.execute(update(ts).where(ts.c.product_id.in_(claim_ids)).values(run_id=run_id))
    if run_id is not None:
        count_outcomes(session, run_id, done=done_delta, failed=failed_delta)
    n_tagged = len(rewrite_ids)
    return WriteOutcome(tagged=n_tagged, failed=len(states) - n_tagged, skipped_newer=skipped)


# PostgreSQL: one statement per table with array parameters (unnest) instead of a round trip per row;
# the statements are constant, so the server prepares them once per connection. product_styles is
# upserted and then the product's rows this statement did not touch (older tagged_at) are deleted:
# re-tagging an already tagged product then updates rows in place, which skips the foreign-key
# checks that DELETE + INSERT would run again for every row.
_PG_UPSERT_STYLES = text(
    "INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, tagged_at) "
    "SELECT u.pid, u.lid, u.score, u.prim, :mv, :now FROM unnest("
    "CAST(:pids AS BIGINT[]), CAST(:lids AS BIGINT[]), CAST(:scores AS DOUBLE PRECISION[]), "
    "CAST(:prims AS BOOLEAN[])) AS u(pid, lid, score, prim) "
    "ON CONFLICT (product_id, label_id) DO UPDATE SET score = excluded.score, is_primary = excluded.is_primary, "
    "model_version = excluded.model_version, tagged_at = excluded.tagged_at"
)
_PG_DELETE_STALE_STYLES = text(
    "DELETE FROM product_styles s USING unnest(CAST(:ids AS BIGINT[])) AS u(id) "
    "WHERE s.product_id = u.id AND s.tagged_at <> :now"
)
# Lookups join unnest(ids) rather than ``id = ANY(ids)``: should the planner misjudge a table's size
# (fresh statistics after a bulk load), the worst case is one hash join, not a scan of the table that
# compares every row with every id of the batch.
_PG_LOCK_PRODUCTS = text(
    "SELECT p.id FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) JOIN products p ON p.id = u.id "
    "ORDER BY p.id FOR UPDATE OF p"
)
_PG_PRIOR_STATE = text(
    "SELECT t.product_id, t.status, t.run_id, t.model_version, t.image_version, m.trained_at "
    "FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) "
    "JOIN tag_state t ON t.product_id = u.id LEFT JOIN models m ON m.version = t.model_version"
)
_PG_UPSERT_STATE = text(
    "INSERT INTO tag_state (product_id, model_version, image_version, status, reason, error, attempts, "
    "run_id, updated_at) "
    "SELECT u.pid, :mv, u.iv, u.st, u.reason, u.err, 1, :run_id, :now FROM unnest("
    "CAST(:pids AS BIGINT[]), CAST(:ivs AS TEXT[]), CAST(:sts AS TEXT[]), CAST(:reasons AS TEXT[]), "
    "CAST(:errs AS TEXT[])) AS u(pid, iv, st, reason, err) "
    "ON CONFLICT (product_id) DO UPDATE SET model_version = excluded.model_version, "
    "image_version = excluded.image_version, status = excluded.status, reason = excluded.reason, "
    "error = excluded.error, run_id = COALESCE(excluded.run_id, tag_state.run_id), "
    "attempts = tag_state.attempts + 1, "
    "updated_at = excluded.updated_at"
)


def _pg_array(values) -> str:
    """A PostgreSQL array literal of numbers/booleans: much cheaper than the driver's generic list
    adaptation, which dominated the client's time (floats use repr, which round-trips exactly)."""
    return "{" + ",".join(map(repr, values)) + "}"


def _write_pg(session: Session, rewrite_ids: list[int], styles: list[tuple], states: list[tuple], common: dict) -> None:
    if styles:
        pids, lids, scores, prims = zip(*styles, strict=True)
        session.execute(
            _PG_UPSERT_STYLES,
            {"pids": _pg_array(pids), "lids": _pg_array(lids), "scores": _pg_array(scores),
             "prims": _pg_array(prims), **common},
        )
    if rewrite_ids:
        session.execute(_PG_DELETE_STALE_STYLES, {"ids": _pg_array(rewrite_ids), "now": common["now"]})
    if states:
        pids, ivs, sts, reasons, errs = (list(c) for c in zip(*states, strict=True))
        session.execute(
            _PG_UPSERT_STATE,
            {"pids": _pg_array(pids), "ivs": ivs, "sts": sts, "reasons": reasons, "errs": errs, **common},
        )


def _write_generic(
    session: Session, rewrite_ids: list[int], styles: list[tuple], states: list[tuple], common: dict
) -> None:
    """SQLite (and any dialect with ON CONFLICT): the driver's executemany is already fast there."""
    mv, run_id, now = common["mv"], common["run_id"], common["now"]
    if rewrite_ids:
        table = ProductStyle.__table__
        session.execute(delete(table).where(table.c.product_id.in_(rewrite_ids)))
    if styles:
        session.execute(
            dialect_insert(session, ProductStyle),
            [{"product_id": p, "label_id": lid, "score": sc, "is_primary": pr, "model_version": mv, "tagged_at": now}
             for p, lid, sc, pr in styles],
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
                    "run_id": func.coalesce(ins.excluded.run_id, TagState.__table__.c.run_id),
                    "attempts": TagState.__table__.c.attempts + 1,
                    "updated_at": ins.excluded.updated_at,
                },
            ),
            [{"product_id": p, "model_version": mv, "image_version": iv, "status": st, "reason": rs, "error": er,
              "run_id": run_id, "attempts": 1, "updated_at": now}
             for p, iv, st, rs, er in states],
        )
