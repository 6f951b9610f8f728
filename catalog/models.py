"""The models that write tags, as the catalog knows them.

Today a model is registered before it writes (its ``trained_at`` orders it against other models: an older
model never overwrites a newer model's tags); the model-lifecycle work turns this into the registry
(shadow / active / retired, activation order).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.db import dialect_insert
from catalog.errors import StyletagError
from catalog.schema import ModelVersion


class ModelVersionConflict(StyletagError):
    """A model version string is already registered with a different training time."""


def utc(dt: datetime) -> datetime:
    """Aware UTC. SQLite stores datetimes without a zone, so every value we write is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def register_model(session: Session, version: str, trained_at: datetime, taxonomy: str, backbone: str) -> None:
    """Record a model before it writes tags (its trained_at orders it against other models).
    Idempotent; a version string re-used with another trained_at is refused, since it would
    silently change which tags count as newer."""
    trained_at = utc(trained_at)
    stmt = dialect_insert(session, ModelVersion).on_conflict_do_nothing(index_elements=["version"])
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
