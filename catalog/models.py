"""The model registry: every model that may write tags, and which one is active per taxonomy.

A model's ``version`` is the hash of its weights and of the metadata that changes its predictions
(``model.metadata``, checkpoint format 2), so a checkpoint re-saved with other thresholds is another model.
Status: ``shadow`` (registered; may write shadow predictions, ``retag --shadow``), ``active`` (what workers
serve for its taxonomy: one per taxonomy, a partial unique index says so), ``retired`` (never activated
again unless a person asks for it by version).

Which tags win is decided by activation, never by training time: the tag writer (``catalog.tags``) accepts
a write only from the taxonomy's active model (and, inside a run, only from the run's own model while the
run is unfinished). :func:`activate` cancels the unfinished runs of every other model of the taxonomy in
the same transaction (they are superseded), so no straggling worker writes them afterwards.
:func:`rollback` re-activates the model that was active before the current one.

``STYLETAG_MODEL`` (or the shipped checkpoint) is only the bootstrap: :func:`ensure_active` registers and
activates it when the registry has no active model for its taxonomy. Without ``STYLETAG_MODEL``, a
deployment serves the taxonomy whose model a person activated (:func:`chosen_taxonomies`), so a shop that
registers and activates a model of its own taxonomy is served that taxonomy with no further setting.

Concurrency: :func:`activate` first cancels the runs (their rows locked), then changes the models rows. The
writer locks a run's row (its counter update) before reading the model's row ``FOR SHARE``: the same
order, so the two never deadlock, and a write that commits after an activation sees it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from catalog.db import dialect_insert
from catalog.errors import NotFound, StyletagError
from catalog.schema import ModelVersion, TaggingRun

BUILTIN = "builtin:"  # a shipped checkpoint, resolved against model/weights/ of whatever host loads it
BOOTSTRAP = "bootstrap"


class ModelVersionConflict(StyletagError):
    """A model version string is already registered with other properties (training time, metadata)."""


class RegistryError(StyletagError):
    """A registry operation that cannot be done as asked (activate a retired model, retire the active one,
    roll back with nothing to roll back to, ...)."""


def utc(dt: datetime) -> datetime:
    """Aware UTC. SQLite stores datetimes without a zone, so every value we write is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


@dataclass(frozen=True)
class ModelRecord:
    version: str
    taxonomy: str
    backbone: str
    trained_at: datetime
    registered_at: datetime | None
    path: str
    status: str
    activated_at: datetime | None
    activated_by: str | None
    activation_seq: int | None
    meta: dict

    @classmethod
    def of(cls, row: ModelVersion) -> ModelRecord:
        try:
            meta = json.loads(row.meta or "{}")
        except json.JSONDecodeError:
            meta = {}
        return cls(row.version, row.taxonomy, row.backbone or "", utc(row.trained_at),
                   utc(row.registered_at) if row.registered_at else None, row.path or "", row.status,
                   utc(row.activated_at) if row.activated_at else None, row.activated_by, row.activation_seq,
                   meta if isinstance(meta, dict) else {})

    def as_dict(self) -> dict:
        iso = (lambda d: d.isoformat() if d else None)  # noqa: E731
        return {"version": self.version, "taxonomy": self.taxonomy, "backbone": self.backbone,
                "status": self.status, "trained_at": iso(self.trained_at), "registered_at": iso(self.registered_at),
                "activated_at": iso(self.activated_at), "activated_by": self.activated_by,
                "activation_seq": self.activation_seq, "path": self.path,
                "metrics": self.meta.get("metrics") or {}, "review_threshold": self.meta.get("review_threshold"),
                "thresholds": self.meta.get("thresholds")}


# --- paths ----------------------------------------------------------------------------------------------


def _weights_dir() -> Path:
    from model.weights import WEIGHTS_DIR

    return Path(WEIGHTS_DIR).resolve()


def stored_path(path: str | Path) -> str:
    """What the registry records for a checkpoint file: ``builtin:NAME`` for a shipped checkpoint (so every
    host resolves it in its own install), else the absolute path (or the URI as given)."""
    text = str(path)
    if text.startswith(BUILTIN) or "://" in text:
        return text
    p = Path(text).resolve()
    if p.parent == _weights_dir():
        return BUILTIN + p.name
    return str(p)


def resolve_path(stored: str) -> Path:
    """The local file of a registry path (``builtin:`` names resolve into model/weights/)."""
    if stored.startswith(BUILTIN):
        return _weights_dir() / stored[len(BUILTIN):]
    if stored.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(stored).path))
    if "://" in stored:
        raise RegistryError(f"model path {stored!r}: only local files (or file:// URIs) can be loaded; copy the "
                            "checkpoint onto each worker host and register that path")
    return Path(stored)


# --- reading --------------------------------------------------------------------------------------------


def get_model(session: Session, version: str, *, lock: bool = False) -> ModelRecord:
    """The registered model ``version`` (a unique prefix of at least 6 hex digits also works)."""
    row = session.get(ModelVersion, version, with_for_update=lock or None)
    if row is None and isinstance(version, str) and len(version) >= 6:
        rows = list(session.scalars(select(ModelVersion).where(ModelVersion.version.startswith(version, autoescape=True))
                                    .limit(2)))
        if len(rows) == 1:
            row = rows[0] if not lock else session.get(ModelVersion, rows[0].version, with_for_update=True)
    if row is None:
        raise NotFound(f"no registered model {str(version)[:64]!r}; 'styletag model list' shows them "
                       "('styletag model register PATH' adds one)")
    return ModelRecord.of(row)


def list_models(session: Session, taxonomy: str | None = None) -> list[ModelRecord]:
    """Every registered model: active first, then by registration, newest first."""
    query = select(ModelVersion)
    if taxonomy is not None:
        query = query.where(ModelVersion.taxonomy == taxonomy)
    rows = session.scalars(query.order_by(ModelVersion.taxonomy, (ModelVersion.status == "active").desc(),
                                          ModelVersion.registered_at.desc(), ModelVersion.version))
    return [ModelRecord.of(r) for r in rows]


def active_model(session: Session, taxonomy: str) -> ModelRecord | None:
    row = session.scalars(select(ModelVersion).where(ModelVersion.taxonomy == taxonomy,
                                                     ModelVersion.status == "active")).first()
    return ModelRecord.of(row) if row is not None else None


def active_versions(session: Session) -> dict[str, str]:
    """taxonomy -> version of its active model."""
    return dict(session.execute(select(ModelVersion.taxonomy, ModelVersion.version)
                                .where(ModelVersion.status == "active")).all())


def chosen_taxonomies(session: Session) -> list[str]:
    """Taxonomies whose active model a person (or a tool) activated, not the bootstrap: sorted."""
    rows = session.scalars(select(ModelVersion.taxonomy).where(ModelVersion.status == "active",
                                                              ModelVersion.activated_by.is_not(None),
                                                              ModelVersion.activated_by != BOOTSTRAP))
    return sorted(set(rows))


# --- registering ----------------------------------------------------------------------------------------


def register_model(session: Session, version: str, trained_at: datetime, taxonomy: str, backbone: str, *,
                   path: str = "", meta: dict | None = None, digest: str | None = None,
                   bootstrap: bool = True) -> ModelRecord:
    """Record a model (status ``shadow``). Idempotent; a version re-used with another training time, another
    taxonomy or other prediction metadata (``digest``, ``model.metadata.prediction_digest``) is refused.
    With ``bootstrap`` (the default), a model of a taxonomy that has no active model becomes active
    (activated_by "bootstrap"): an empty registry serves what it is given."""
    trained_at = utc(trained_at)
    stored = dict(meta or {})
    if digest is not None:
        stored["prediction_digest"] = digest
    stmt = dialect_insert(session, ModelVersion).on_conflict_do_nothing(index_elements=["version"])
    session.execute(stmt, [{"version": version, "trained_at": trained_at, "taxonomy": taxonomy, "backbone": backbone,
                            "registered_at": datetime.now(UTC), "path": path, "meta": json.dumps(stored, default=str),
                            "status": "shadow"}])
    row = session.get(ModelVersion, version)
    session.refresh(row)
    if utc(row.trained_at) != trained_at or row.taxonomy != taxonomy:
        raise ModelVersionConflict(
            f"model version {version!r} is already registered with trained_at {utc(row.trained_at).isoformat()} "
            f"(taxonomy {row.taxonomy!r}), not {trained_at.isoformat()} ({taxonomy!r}); give a retrained model "
            "a new version")
    have = ModelRecord.of(row).meta.get("prediction_digest")
    if digest is not None and have is not None and have != digest:
        # A format-1 checkpoint (version = weights only) re-saved with other thresholds or preprocessing.
        raise ModelVersionConflict(
            f"model version {version!r} is already registered with other prediction metadata (thresholds, "
            "preprocessing, taxonomy); re-save the checkpoint with this styletag (format 2) so it gets a version "
            "of its own")
    if digest is not None and have is None:
        row.meta = json.dumps({**ModelRecord.of(row).meta, **stored}, default=str)
    if path and not row.path:
        row.path = path
    session.flush()
    if bootstrap and active_model(session, taxonomy) is None and row.status != "retired":
        return activate(session, version, by=BOOTSTRAP)
    return ModelRecord.of(row)


def register_checkpoint(session: Session, path: str | Path, *, bootstrap: bool = False) -> ModelRecord:
    """Register a checkpoint file by its metadata (read without torch; the caller verifies the weights
    with ``model.checkpoint.load_checkpoint`` where it can). Syncs its taxonomy's labels."""
    from catalog.labels import sync_labels
    from model.metadata import CheckpointMeta, prediction_digest

    meta = CheckpointMeta.read(resolve_path(stored_path(path)))
    sync_labels(session, meta.taxonomy)
    raw = meta.raw
    info = {"metrics": raw.get("metrics") or {}, "command": raw.get("command") or "",
            "format": raw.get("format") or "styletag-checkpoint/1", "thresholds": meta.thresholds,
            "review_threshold": raw.get("review_threshold"), "input_size": meta.input_size,
            "channels": meta.channels}
    return register_model(session, meta.model_version, meta.trained_at, meta.taxonomy.name, meta.backbone,
                          path=stored_path(path), meta=info, digest=prediction_digest(raw), bootstrap=bootstrap)


def ensure_active(session: Session, default_path: str | Path) -> ModelRecord:
    """The active model of ``default_path``'s taxonomy; registers and activates that checkpoint (activated_by
    "bootstrap") when the registry has none. Also registers the default when it is new (as shadow)."""
    from catalog.labels import sync_labels
    from model.metadata import CheckpointMeta

    meta = CheckpointMeta.read(resolve_path(stored_path(default_path)))
    current = active_model(session, meta.taxonomy.name)
    if current is not None:
        sync_labels(session, meta.taxonomy)
        return current
    if session.get_bind().dialect.name == "postgresql":  # two bootstrapping workers: one activation
        from sqlalchemy import text

        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ACTIVATION_KEY})
        current = active_model(session, meta.taxonomy.name)
        if current is not None:
            return current
    record = register_checkpoint(session, default_path, bootstrap=True)
    if record.status != "active":
        raise RegistryError(f"taxonomy {meta.taxonomy.name!r} has no active model and its bootstrap checkpoint "
                            f"{record.version} is retired; 'styletag model activate VERSION' activates one")
    return record


# --- lifecycle ------------------------------------------------------------------------------------------

_ACTIVATION_KEY = 0x5759_1E7A_0D31_0001


def _lock_registry(session: Session) -> None:
    """Serialise activations (PostgreSQL: a transaction-level advisory lock; SQLite's BEGIN IMMEDIATE does)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy import text

        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ACTIVATION_KEY})


def superseded_runs(session: Session, taxonomy: str, keep_version: str) -> list[int]:
    """Unfinished non-shadow runs of the taxonomy's other models."""
    from catalog.runs import UNFINISHED

    others = select(ModelVersion.version).where(ModelVersion.taxonomy == taxonomy,
                                                ModelVersion.version != keep_version)
    return list(session.scalars(select(TaggingRun.id).where(TaggingRun.status.in_(UNFINISHED),
                                                            TaggingRun.kind != "shadow",
                                                            TaggingRun.model_version.in_(others))
                                .order_by(TaggingRun.id)))


def activate(session: Session, version: str, *, by: str) -> ModelRecord:
    """Make ``version`` the active model of its taxonomy: the previous one goes back to ``shadow`` (rollback
    can bring it back), the unfinished runs of the taxonomy's other models are cancelled (superseded).
    Activating the active model again changes nothing."""
    from catalog.runs import cancel_run

    _lock_registry(session)
    target = get_model(session, version)
    if target.status == "active":
        return target
    # Runs first (their rows locked by the update), then the models rows: the writer's order.
    for run_id in superseded_runs(session, target.taxonomy, target.version):
        cancel_run(session, run_id)
    now = datetime.now(UTC)
    table = ModelVersion.__table__
    session.execute(update(table).where(table.c.taxonomy == target.taxonomy, table.c.status == "active")
                    .values(status="shadow"))
    seq = (session.scalar(select(func.max(ModelVersion.activation_seq))) or 0) + 1
    session.execute(update(table).where(table.c.version == target.version)
                    .values(status="active", activated_at=now, activated_by=(by or "unknown")[:128],
                            activation_seq=seq))
    session.flush()
    session.expire_all()
    return get_model(session, target.version)


def previous_model(session: Session, taxonomy: str) -> ModelRecord | None:
    """The model a rollback would activate: the most recently activated model of the taxonomy other than
    the active one, and not retired."""
    current = active_model(session, taxonomy)
    query = (select(ModelVersion).where(ModelVersion.taxonomy == taxonomy, ModelVersion.activation_seq.is_not(None),
                                        ModelVersion.status == "shadow")
             .order_by(ModelVersion.activation_seq.desc()))
    if current is not None:
        query = query.where(ModelVersion.version != current.version)
    row = session.scalars(query).first()
    return ModelRecord.of(row) if row is not None else None


def taxonomy_of_choice(session: Session, taxonomy: str | None) -> str:
    if taxonomy is not None:
        return taxonomy
    have = sorted(active_versions(session))
    if len(have) == 1:
        return have[0]
    if not have:
        raise RegistryError("no model is active; 'styletag model activate VERSION' activates one")
    raise RegistryError(f"several taxonomies have an active model ({', '.join(have)}); say which with --taxonomy")


def rollback(session: Session, *, by: str, taxonomy: str | None = None) -> tuple[ModelRecord, ModelRecord | None]:
    """Re-activate the previously active model of the taxonomy; returns (now active, the one replaced)."""
    _lock_registry(session)
    taxonomy = taxonomy_of_choice(session, taxonomy)
    current = active_model(session, taxonomy)
    previous = previous_model(session, taxonomy)
    if previous is None:
        raise RegistryError(f"taxonomy {taxonomy!r} has no earlier active model to roll back to "
                            "('styletag model list' shows the registry)")
    return activate(session, previous.version, by=by), current


def retire(session: Session, version: str, *, by: str) -> ModelRecord:
    """Take a non-active model out of rollback's reach (it can still be activated by version)."""
    _lock_registry(session)
    target = get_model(session, version)
    if target.status == "active":
        raise RegistryError(f"model {target.version} is active; activate another one (or 'styletag model rollback') "
                            "before retiring it")
    table = ModelVersion.__table__
    meta = {**target.meta, "retired_by": (by or "unknown")[:128], "retired_at": datetime.now(UTC).isoformat()}
    session.execute(update(table).where(table.c.version == target.version)
                    .values(status="retired", meta=json.dumps(meta, default=str)))
    session.expire_all()
    return get_model(session, target.version)


def operator() -> str:
    """Who runs this command, for ``activated_by`` (the OS account; no environment read)."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, OSError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"

