"""Writing a batch of predictions (and failures) into the catalog, idempotently.

The worker calls :func:`write_batch` once per batch inside its one transaction. Three promises:

* **Idempotent.** Writing the same batch twice (a redelivered Celery message) leaves the same rows
  and the same run counters: product_styles are replaced, tag_state is upserted, and a product counts
  toward ``tagging_runs.done``/``failed`` only when it first reaches a final state in that run.
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

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from catalog.errors import NotFound, StyletagError
from catalog.schema import ModelVersion, Product, ProductStyle, TaggingRun, TagState

FAILURE_REASONS = ("missing", "forbidden", "too_large", "bad_image", "too_many_pixels", "unreachable", "error")


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
    reason: str  # a short code: missing, forbidden, too_large, bad_image, too_many_pixels, unreachable
    error: str  # the one-line message of the typed error


@dataclass(frozen=True)
class WriteOutcome:
    tagged: int  # products whose tags were (re)written
    failed: int  # products whose failure was recorded
    skipped_newer: int  # products left alone because a later-trained model tagged them


class ModelVersionConflict(StyletagError):
    """A model version string is already registered with a different training time."""


def utc(dt: datetime) -> datetime:
    """Aware UTC. SQLite stores datetimes without a zone, so every value we write is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _insert(session: Session, entity):
    """The dialect's INSERT (for ON CONFLICT) on the plain table: Core executemany, no ORM overhead."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(entity.__table__)
    if name == "sqlite":
        return sqlite.insert(entity.__table__)
    raise NotImplementedError(f"unsupported database dialect {name!r}")


def register_model(session: Session, version: str, trained_at: datetime, taxonomy: str, backbone: str) -> None:
    """Record a model before it writes tags (its trained_at orders it against other models).
    Idempotent; a version string re-used with another trained_at is refused, since it would
    silently change which tags count as newer."""
    trained_at = utc(trained_at)
    stmt = _insert(session, ModelVersion).on_conflict_do_nothing(index_elements=["version"])
    session.execute(
        stmt,
        [{"version": version, "trained_at": trained_at, "taxonomy": taxonomy, "backbone": backbone,
          "registered_at": datetime.now(UTC)}],
    )
    have = session.execute(select(ModelVersion.trained_at).where(ModelVersion.version == version)).scalar_one()
    if utc(have) != trained_at:
        raise ModelVersionConflict(
            f"model version {version!r} is already registered with trained_at {utc(have).isoformat()}, "
            f"not {trained_at.isoformat()}; give a retrained model a new version"
        )


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

    lock = select(Product.id).where(Product.id.in_(ids)).order_by(Product.id)
    if dialect == "postgresql":
        lock = lock.with_for_update()
    present = set(session.scalars(lock))

    prior_rows = session.execute(
        select(TagState.product_id, TagState.status, TagState.run_id, ModelVersion.trained_at)
        .outerjoin(ModelVersion, ModelVersion.version == TagState.model_version)
        .where(TagState.product_id.in_(ids))
    ).all()
    prior = {r.product_id: r for r in prior_rows}

    now = datetime.now(UTC)
    style_rows: list[dict] = []
    state_rows: list[dict] = []
    rewrite_ids: list[int] = []
    done_delta = failed_delta = skipped = 0
    n_tagged = n_failed = 0
    for pid in ids:
        if pid not in present:  # deleted since the batch was enqueued: nothing to tag
            continue
        item = by_id[pid]
        before = prior.get(pid)
        if before is not None and before.trained_at is not None and before.trained_at > trained_at:
            skipped += 1
            continue
        same_run = run_id is not None and before is not None and before.run_id == run_id
        is_tag = isinstance(item, ProductTags)
        if not is_tag and same_run and before.status == "tagged":
            continue  # already tagged in this run: a later (redelivered) failure must not undo it
        if run_id is not None:
            if not same_run:
                done_delta += is_tag
                failed_delta += not is_tag
            elif is_tag and before.status == "failed":
                done_delta += 1
                failed_delta -= 1
        state = {
            "product_id": pid, "model_version": model_version, "image_version": item.image_version,
            "run_id": run_id, "attempts": 1, "updated_at": now,
        }
        if is_tag:
            n_tagged += 1
            rewrite_ids.append(pid)
            per_label: dict[int, Tag] = {t.label_id: t for t in item.tags}
            style_rows.extend(
                {"product_id": pid, "label_id": t.label_id, "score": _score(t.score, pid),
                 "is_primary": bool(t.is_primary), "model_version": model_version, "tagged_at": now}
                for t in per_label.values()
            )
            state.update(status="tagged", reason=None, error=None)
        else:
            n_failed += 1
            state.update(status="failed", reason=item.reason[:32], error=(item.error or "")[:2000])
        state_rows.append(state)

    if rewrite_ids:
        styles = ProductStyle.__table__
        session.execute(delete(styles).where(styles.c.product_id.in_(rewrite_ids)))
    if style_rows:
        session.execute(_insert(session, ProductStyle), style_rows)
    if state_rows:
        ins = _insert(session, TagState)
        session.execute(
            ins.on_conflict_do_update(
                index_elements=["product_id"],
                set_={
                    "model_version": ins.excluded.model_version,
                    "image_version": ins.excluded.image_version,
                    "status": ins.excluded.status,
                    "reason": ins.excluded.reason,
                    "error": ins.excluded.error,
                    "run_id": ins.excluded.run_id,
                    "attempts": TagState.__table__.c.attempts + 1,
                    "updated_at": ins.excluded.updated_at,
                },
            ),
            state_rows,
        )
    if run_id is not None and (done_delta or failed_delta):
        runs = TaggingRun.__table__
        session.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(done=runs.c.done + done_delta, failed=runs.c.failed + failed_delta)
        )
    return WriteOutcome(tagged=n_tagged, failed=n_failed, skipped_newer=skipped)


def finish_run_if_complete(session: Session, run_id: int) -> bool:
    """Mark a running run done once every product has a final state; True when this call did it
    (so exactly one worker logs "run finished")."""
    runs = TaggingRun.__table__
    result = session.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.status == "running", runs.c.done + runs.c.failed >= runs.c.total)
        .values(status="done", finished_at=datetime.now(UTC))
    )
    return bool(result.rowcount)
