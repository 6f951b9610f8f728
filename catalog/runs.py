"""Tagging runs: what a retag covers, and which of its products still need work.

A run is fixed when it starts: ``max_product_id`` bounds it, so products uploaded meanwhile go to the
uploads path instead of making a nightly run chase a moving target. Which products are still to do
is read from tag_state (the source of truth), never from the queue: resuming after a lost broker is
just scanning again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from catalog.errors import NotFound
from catalog.schema import RUN_KINDS, RUN_SCOPES, Product, TaggingRun, TagState


def create_run(session: Session, kind: str, scope: str, model_version: str) -> TaggingRun:
    """A new run in status ``enqueuing``, covering products up to the current max id. Flushed (so it
    has an id), not committed."""
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}; use one of {', '.join(RUN_KINDS)}")
    if scope not in RUN_SCOPES:
        raise ValueError(f"unknown run scope {scope!r}; use one of {', '.join(RUN_SCOPES)}")
    max_id = session.execute(select(func.max(Product.id))).scalar() or 0
    run = TaggingRun(
        kind=kind, scope=scope, model_version=model_version, status="enqueuing", total=0, done=0, failed=0,
        max_product_id=max_id, created_at=datetime.now(UTC),
    )
    session.add(run)
    session.flush()
    return run


def start_run(session: Session, run_id: int, total: int) -> None:
    """Record how many products the producer enqueued and let workers finish the run."""
    table = TaggingRun.__table__
    session.execute(update(table).where(table.c.id == run_id).values(total=total, status="running"))


def cancel_run(session: Session, run_id: int) -> None:
    table = TaggingRun.__table__
    session.execute(
        update(table)
        .where(table.c.id == run_id, table.c.status.in_(("enqueuing", "running")))
        .values(status="cancelled", finished_at=datetime.now(UTC))
    )


def _todo_query(run: TaggingRun, include_failed: bool):
    state = TagState
    not_final_here = or_(state.product_id.is_(None), state.run_id.is_distinct_from(run.id))
    if include_failed:
        not_final_here = or_(not_final_here, state.status == "failed")
    query = (
        select(Product.id)
        .outerjoin(state, state.product_id == Product.id)
        .where(Product.id <= run.max_product_id, not_final_here)
    )
    if run.scope == "changed":
        # Changed = never tagged, failed, tagged by another model, or the image changed since
        # (NULL-safe: a product without an image version is unchanged if none was recorded).
        query = query.where(
            or_(
                state.product_id.is_(None),
                state.status != "tagged",
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
    """JSON-ready view of a run (for ``--json`` output and progress reporting)."""
    finished = run.done + run.failed
    return {
        "id": run.id,
        "kind": run.kind,
        "scope": run.scope,
        "model_version": run.model_version,
        "status": run.status,
        "total": run.total,
        "done": run.done,
        "failed": run.failed,
        "remaining": max(run.total - finished, 0),
        "progress": round(finished / run.total, 4) if run.total else (1.0 if run.status == "done" else 0.0),
        "max_product_id": run.max_product_id,
        "created_at": _iso(run.created_at),
        "finished_at": _iso(run.finished_at),
    }
