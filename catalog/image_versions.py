"""Image versions that notice a new photo: :func:`refresh_image_versions` reads every product image's version
(HEAD: S3 ETag, file size and mtime, https ETag) and records the ones that changed, so that
``retag --changed-only`` retags a photo replaced behind an unchanged URI."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, func, select, update

from catalog.db import session_scope
from catalog.product_rows import (
    VERSION_MAX,
)
from catalog.product_upsert import head_threads
from catalog.schema import Product
from catalog.settings import Settings

_P = Product.__table__

@dataclass
class ImageCheck:
    checked: int = 0
    changed: int = 0  # products whose image_version was updated (a new photo, or a first version)
    unreadable: int = 0  # left as they were
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def refresh_image_versions(settings: Settings, *, progress: bool | Callable[[int], None] = False,
                           page: int = 1000) -> ImageCheck:
    """HEAD every non-archived product's image (``fetch_threads`` at a time) and record its version where it
    changed: a photo replaced at the same URI (new bytes, new ETag / size-mtime) becomes a changed product for
    ``retag --changed-only``. One short transaction per page; a product whose URI changed meanwhile is left
    to whoever changed it."""
    from catalog.storage import ImageReader

    started = time.perf_counter()
    reader = ImageReader.from_settings(settings)
    result = ImageCheck()
    bar = None
    if progress is True:
        from tqdm import tqdm

        with session_scope(settings.database_url) as session:
            total = session.scalar(select(func.count()).select_from(_P).where(_P.c.archived_at.is_(None)))
        bar = tqdm(total=total, unit="img", desc="image check", file=sys.stderr, dynamic_ncols=True)
    last = 0
    while True:
        with session_scope(settings.database_url) as session:
            rows = session.execute(
                select(_P.c.id, _P.c.image_uri, _P.c.image_version)
                .where(_P.c.id > last, _P.c.archived_at.is_(None)).order_by(_P.c.id).limit(page)).all()
        if not rows:
            break
        last = rows[-1].id
        uris = [r.image_uri for r in rows]
        infos = reader.head_many(uris, max_workers=head_threads(uris, settings.fetch_threads))
        changes = []
        for r, info in zip(rows, infos, strict=True):
            if isinstance(info, Exception):
                result.unreadable += 1
            elif str(info.version)[:VERSION_MAX] != r.image_version:
                changes.append({"pid": r.id, "uri": r.image_uri, "version": str(info.version)[:VERSION_MAX],
                                "now": datetime.now(UTC)})
        if changes:
            with session_scope(settings.database_url) as session:
                done = session.connection().execute(
                    update(_P).where(_P.c.id == bindparam("pid"), _P.c.image_uri == bindparam("uri"))
                    .values(image_version=bindparam("version"), updated_at=bindparam("now")), changes)
                result.changed += done.rowcount if done.rowcount and done.rowcount > 0 else len(changes)
        result.checked += len(rows)
        if bar is not None:
            bar.update(len(rows))
        elif callable(progress):
            progress(len(rows))
    if bar is not None:
        bar.close()
    result.seconds = round(time.perf_counter() - started, 3)
    return result
