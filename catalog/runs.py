"""Tagging runs: this module is their only owner. Every status change (create, running, done, cancelled,
the nightly claim) and every counter change (total, done, failed, skipped, review, and the failures by
reason in ``run_failure_counts``) happens here; nothing else updates ``tagging_runs``.

Counters: ``done`` = products the run wrote (``review`` of them held for review), ``failed`` = products it
recorded as failed (``run_failure_counts`` by reason, changed exactly when ``failed`` is), ``skipped`` =
products of the run not written because they were archived or deleted meanwhile. A run is complete when
done + failed + skipped reaches its total. A write the tag writer refuses (a superseded or finished run, a
model that is not active) counts nowhere.

A run is fixed when it starts: ``max_product_id`` bounds it, so products uploaded meanwhile go to the
uploads path instead of making a nightly run chase a moving target. Which products are still to do
is read from tag_state (the source of truth), never from the queue: resuming after a lost broker is
just scanning again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import exists, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from catalog.db import dialect_insert
from catalog.errors import NotFound, StyletagError
from catalog.schema import (
    RUN_KINDS,
    RUN_SCOPES,
    ModelVersion,
    Product,
    RunFailureCount,
    ShadowTag,
    TaggingRun,
    TagState,
)


class RunStatus(StrEnum):
    ENQUEUING = "enqueuing"  # the producer is still sending its products
    RUNNING = "running"  # everything is sent; workers finish it
    DONE = "done"  # every product has a final state in this run
    CANCELLED = "cancelled"


UNFINISHED = (RunStatus.ENQUEUING.value, RunStatus.RUNNING.value)
# Any fixed 64-bit number, the same in every process: the key of the nightly claim's advisory lock.
NIGHTLY_ADVISORY_KEY = 0x5759_1E7A_6E16_4701 & 0x7FFF_FFFF_FFFF_FFFF
_RUNS = TaggingRun.__table__


def create_run(session: Session, kind: str, scope: str, model_version: str) -> TaggingRun:
    """A new run in status ``enqueuing``, covering products up to the current max id. Flushed (so it
    has an id), not committed."""
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}; use one of {', '.join(RUN_KINDS)}")
    if scope not in RUN_SCOPES:
        raise ValueError(f"unknown run scope {scope!r}; use one of {', '.join(RUN_SCOPES)}")
    max_id = session.execute(select(func.max(Product.id))).scalar() or 0
    run = TaggingRun(
        kind=kind, scope=scope, model_version=model_version, status=RunStatus.ENQUEUING.value, total=0, done=0,
        failed=0, skipped=0, review=0, max_product_id=max_id, created_at=datetime.now(UTC),
    )
    session.add(run)
    session.flush()
    return run


def add_to_total(session: Session, run_id: int, n: int) -> None:
    """A producer enqueued ``n`` more of the run's products (the total grows page by page)."""
    session.execute(update(_RUNS).where(_RUNS.c.id == run_id).values(total=_RUNS.c.total + n))


def mark_running(session: Session, run_id: int, *, retry_failed: bool = False, total: int | None = None) -> int:
    """Everything is sent: let workers finish the run (and finish it now if nothing is left).

    With ``retry_failed`` (a resume), the run's failed products are taken out of its ``failed`` counter
    and detached from it (``tag_state.run_id`` NULL; status and reason kept until they are retried), in
    this transaction: each then counts again, once, when it is retried, and the run is not done before
    they all have been. Its total is recounted as done + failed + what is still to do, so products its
    producer never reached (it died mid-enqueue) are counted too. Writers wait on the run's row lock, so
    nothing is counted twice. ``total`` sets the total outright (a caller that enqueued a known number).
    Returns how many failed products were detached. A run superseded by an activation (cancelled, its
    model no longer active) cannot be resumed: a new run of the active model does its work."""
    if retry_failed:
        _check_resumable(session, run_id)
    detached = _detach_failed(session, run_id) if retry_failed else 0
    run = session.get(TaggingRun, run_id, with_for_update=True)
    if run is None:
        raise NotFound(f"no tagging run {run_id}; 'styletag runs' lists them")
    run.failed = run.failed - detached
    if retry_failed:
        run.total = run.done + run.failed + run.skipped + count_products_to_tag(session, run, include_failed=True)
    elif total is not None:
        run.total = total
    run.status = RunStatus.RUNNING.value
    run.finished_at = None
    session.flush()
    finish_if_complete(session, run_id)
    return detached


def _check_resumable(session: Session, run_id: int) -> None:
    run = get_run(session, run_id)
    if run.kind == "shadow":
        status = session.scalar(select(ModelVersion.status).where(ModelVersion.version == run.model_version))
        if status == "retired":
            raise StyletagError(f"run {run_id} shadows model {run.model_version}, which is retired; not resuming it")
        return
    status = session.scalar(select(ModelVersion.status).where(ModelVersion.version == run.model_version))
    if status != "active":
        raise StyletagError(f"run {run_id} was superseded: its model {run.model_version} is no longer active; "
                            "'styletag retag --changed-only' tags what is left with the active model")


def _detach_failed(session: Session, run_id: int) -> int:
    # Lock the products first, in id order, as catalog.tags.write_batch does (no deadlock with a
    # worker writing one of them); a write waiting on them then sees them detached and counts once.
    session.execute(
        select(Product.id).join(TagState, TagState.product_id == Product.id)
        .where(TagState.run_id == run_id, TagState.status == "failed")
        .order_by(Product.id).with_for_update(of=Product)
    ).all()
    table = TagState.__table__
    reasons = dict(session.execute(
        select(table.c.reason, func.count()).where(table.c.run_id == run_id, table.c.status == "failed")
        .group_by(table.c.reason)).all())
    result = session.execute(
        update(table).where(table.c.run_id == run_id, table.c.status == "failed").values(run_id=None)
    )
    _count_failures(session, run_id, {reason or "error": -n for reason, n in reasons.items()})
    return result.rowcount or 0


def _count_failures(session: Session, run_id: int, failures: dict[str, int]) -> None:
    """Add to the run's failures by reason (``run_failure_counts``); rows that reach 0 are removed."""
    changes = {r: n for r, n in failures.items() if n}
    if not changes:
        return
    table = RunFailureCount.__table__
    ins = dialect_insert(session, RunFailureCount)
    session.execute(
        ins.on_conflict_do_update(index_elements=["run_id", "reason"],
                                  set_={"count": table.c.count + ins.excluded["count"]}),
        [{"run_id": run_id, "reason": r, "count": n} for r, n in sorted(changes.items())],
    )
    session.execute(table.delete().where(table.c.run_id == run_id, table.c.count == 0))


def count_outcomes(session: Session, run_id: int, *, done: int = 0, failed: int = 0, skipped: int = 0,
                   review: int = 0, failures: dict[str, int] | None = None, model_version: str | None = None) -> bool:
    """Add a write's outcome to the run's counters (the tag writer's counts). With ``model_version``, only
    while the run is unfinished and of that model: False when it is not (cancelled, superseded or finished
    meanwhile; the caller then undoes its write). The update takes the run row's lock, so an activation
    cancelling the run either waits for this write or is seen by it."""
    if model_version is None and not (done or failed or skipped or review):
        return True
    stmt = update(_RUNS).where(_RUNS.c.id == run_id)
    if model_version is not None:
        stmt = stmt.where(_RUNS.c.status.in_(UNFINISHED), _RUNS.c.model_version == model_version)
    result = session.execute(stmt.values(done=_RUNS.c.done + done, failed=_RUNS.c.failed + failed,
                                         skipped=_RUNS.c.skipped + skipped, review=_RUNS.c.review + review))
    if model_version is not None and not result.rowcount:
        return False
    _count_failures(session, run_id, failures or {})
    return True


def finish_if_complete(session: Session, run_id: int) -> bool:
    """Mark a running run done once every product has a final state (written, failed or skipped); True
    when this call did it (so exactly one worker logs "run finished")."""
    result = session.execute(
        update(_RUNS)
        .where(_RUNS.c.id == run_id, _RUNS.c.status == RunStatus.RUNNING.value,
               _RUNS.c.done + _RUNS.c.failed + _RUNS.c.skipped >= _RUNS.c.total)
        .values(status=RunStatus.DONE.value, finished_at=datetime.now(UTC))
    )
    return bool(result.rowcount)


def failure_counts(session: Session, run_id: int) -> dict[str, int]:
    """The run's failures by reason, as counted (``run_failure_counts``), most first."""
    rows = session.execute(select(RunFailureCount.reason, RunFailureCount.count)
                           .where(RunFailureCount.run_id == run_id, RunFailureCount.count > 0)
                           .order_by(RunFailureCount.count.desc(), RunFailureCount.reason)).all()
    return {r: int(n) for r, n in rows}


def run_model(session: Session, run_id: int) -> tuple[str, str, str] | None:
    """(model_version, kind, status) of a run, or None when there is no such run: what a worker needs to
    serve a bulk task with the run's own model."""
    row = session.execute(select(TaggingRun.model_version, TaggingRun.kind, TaggingRun.status)
                          .where(TaggingRun.id == run_id)).first()
    return None if row is None else (row[0], row[1], row[2])


def cancel_run(session: Session, run_id: int) -> None:
    session.execute(
        update(_RUNS)
        .where(_RUNS.c.id == run_id, _RUNS.c.status.in_(UNFINISHED))
        .values(status=RunStatus.CANCELLED.value, finished_at=datetime.now(UTC))
    )


def unfinished_runs(session: Session, kind: str | None = None) -> list[TaggingRun]:
    """Runs still enqueuing or running, oldest first (the nightly guard, metrics, operators)."""
    query = select(TaggingRun).where(TaggingRun.status.in_(UNFINISHED)).order_by(TaggingRun.id)
    if kind is not None:
        query = query.where(TaggingRun.kind == kind)
    return list(session.scalars(query))


def run_age_seconds(run: TaggingRun, now: datetime | None = None) -> float:
    created = run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=UTC)
    return max(0.0, ((now or datetime.now(UTC)) - created).total_seconds())


def claim_nightly(session: Session, model_version: str, *, stale_after_s: float) -> dict:
    """In the caller's transaction: report the nightly run still going, or cancel one left ``enqueuing``
    longer than ``stale_after_s`` (its producer died) and create the new run. Returns
    ``{"created": run_id, "cancelled": ...}`` or ``{"busy": run, "cancelled": ...}``.

    Two concurrent claims never both create a run: on PostgreSQL the check and the insert happen under a
    transaction-level advisory lock; SQLite's ``BEGIN IMMEDIATE`` serialises them there."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": NIGHTLY_ADVISORY_KEY})
    busy = next(iter(unfinished_runs(session, "nightly")), None)
    cancelled = None
    if busy is not None and busy.status == RunStatus.ENQUEUING and run_age_seconds(busy) > stale_after_s:
        cancel_run(session, busy.id)
        session.refresh(busy)
        cancelled = run_as_dict(busy)
        busy = next(iter(unfinished_runs(session, "nightly")), None)
    if busy is not None:
        return {"busy": run_as_dict(busy), "cancelled": cancelled}
    run = create_run(session, kind="nightly", scope="changed", model_version=model_version)
    return {"created": run.id, "cancelled": cancelled}


def _todo_query(run: TaggingRun, include_failed: bool):
    if run.kind == "shadow":  # every product without this run's shadow predictions yet
        done_here = exists().where(ShadowTag.product_id == Product.id, ShadowTag.model_version == run.model_version,
                                   ShadowTag.run_id == run.id)
        return select(Product.id).where(Product.id <= run.max_product_id, ~done_here)
    state = TagState
    not_final_here = or_(state.product_id.is_(None), state.run_id.is_distinct_from(run.id))
    if include_failed:
        not_final_here = or_(not_final_here, state.status == "failed")
    query = (
        select(Product.id)
        .outerjoin(state, state.product_id == Product.id)
        .where(Product.id <= run.max_product_id, Product.archived_at.is_(None), not_final_here)  # archived: never
    )
    if run.scope == "changed":
        # Changed = never tagged, failed, tagged by another model, or the image changed since
        # (NULL-safe: a product without an image version is unchanged if none was recorded). A product
        # held for review is tagged (by its model) as far as runs go.
        query = query.where(
            or_(
                state.product_id.is_(None),
                state.status.not_in(("tagged", "review")),
                state.model_version != run.model_version,
                state.image_version.is_distinct_from(Product.image_version),
            )
        )
    return query


def count_products_to_tag(session: Session, run: TaggingRun, include_failed: bool = False) -> int:
    """How many products ``iter_products_to_tag`` would yield now (one COUNT)."""
    return int(session.scalar(select(func.count()).select_from(_todo_query(run, include_failed).subquery())) or 0)


def iter_products_to_tag(
    session_factory: sessionmaker[Session], run: TaggingRun, page: int = 1000, include_failed: bool = False
) -> Iterator[list[int]]:
    """Pages of product ids the run still has to tag, in id order. Keyset pagination (``id > last``),
    one short transaction per page: constant memory and no long-held snapshot on a large catalog.
    ``include_failed`` also yields products that failed in this run (``retag --resume``)."""
    if page < 1:
        raise ValueError("page must be at least 1")
    base = _todo_query(run, include_failed)
    last = 0
    while True:
        with session_factory() as session:
            ids = list(session.scalars(base.where(Product.id > last).order_by(Product.id).limit(page)))
        if not ids:
            return
        yield ids
        if len(ids) < page:
            return
        last = ids[-1]


def get_run(session: Session, run_id: int) -> TaggingRun:
    if not isinstance(run_id, int) or not 0 < run_id < 2**63:
        raise NotFound(f"no tagging run {str(run_id)[:40]}; run ids are positive integers ('styletag runs' lists them)")
    run = session.get(TaggingRun, run_id)
    if run is None:
        raise NotFound(f"no tagging run {run_id}; 'styletag runs' lists them")
    return run


def list_runs(session: Session, limit: int = 20) -> list[TaggingRun]:
    """Newest first."""
    return list(session.scalars(select(TaggingRun).order_by(TaggingRun.id.desc()).limit(limit)))


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return (dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)).isoformat()


def run_as_dict(run: TaggingRun) -> dict:
    """JSON-ready view of a run (for ``--json`` output and progress reporting): ``written`` (= ``done``,
    the products it wrote), ``review`` (of those, held for review), ``skipped``, ``failed``."""
    skipped, review = int(run.skipped or 0), int(run.review or 0)
    finished = run.done + run.failed + skipped
    return {
        "id": run.id,
        "kind": run.kind,
        "scope": run.scope,
        "model_version": run.model_version,
        "status": run.status,
        "total": run.total,
        "done": run.done,
        "written": run.done,
        "review": review,
        "skipped": skipped,
        "failed": run.failed,
        "remaining": max(run.total - finished, 0),
        "progress": round(finished / run.total, 4) if run.total else (1.0 if run.status == "done" else 0.0),
        "max_product_id": run.max_product_id,
        "created_at": _iso(run.created_at),
        "finished_at": _iso(run.finished_at),
    }
