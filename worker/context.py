"""Everything a tagging process holds once: settings, the predictor, the image reader, label ids.

Built lazily, once per process (in a Celery pool child after the fork, or in the inline CLI), so
the parent that forks never imports torch or touches CUDA.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from catalog.settings import Settings

log = logging.getLogger("styletag.worker")

_lock = threading.Lock()
_context: WorkerContext | None = None


@dataclass
class WorkerContext:
    settings: Settings
    device: str | None = None
    # CPU inference: how many threads run the model at once, each on its own slice of the batch with
    # one intra-op thread (see Pipeline.predict). 1 on a GPU.
    model_threads: int = field(default=1, init=False)

    @cached_property
    def predictor(self):
        import torch

        from model.predictor import Predictor

        threads = self.settings.torch_threads
        predictor = Predictor.from_checkpoint(checkpoint_path(self.settings), device=self.device,
                                              batch_size=self.settings.batch_size)
        if predictor.device.type == "cpu":
            # Split each batch over N threads with one intra-op thread each, instead of one call with N
            # intra-op threads: torch's per-operator barriers stall whenever the OS preempts one of its
            # threads (decode threads, the database, a neighbour), which on a shared or small machine
            # cost 2x at batch 256 and 10x on small upload batches (docs/performance.md).
            self.model_threads = threads or _default_torch_threads()
            torch.set_num_threads(1)
        elif threads > 0:
            torch.set_num_threads(threads)
        log.info(
            "model loaded: version=%s backbone=%s device=%s input=%dpx model_threads=%d",
            predictor.model_version, predictor.backbone, predictor.device, predictor.input_size, self.model_threads,
        )
        return predictor

    @cached_property
    def reader(self):
        from catalog.storage import ImageReader

        return ImageReader.from_settings(self.settings)

    @cached_property
    def labels(self):
        """Label ids of the model's taxonomy; creates them in the catalog when they are new."""
        from catalog.db import session_scope
        from catalog.labels import sync_labels
        from catalog.models import register_model

        p = self.predictor
        with session_scope(self.settings.database_url) as session:
            labels = sync_labels(session, p.taxonomy)
            register_model(session, p.model_version, p.trained_at, p.taxonomy.name, p.backbone)
        return labels


_TORCH_DEFAULT_THREADS: int | None = None


def _default_torch_threads() -> int:
    """torch's own default intra-op thread count, read before any context set it to 1: a second context
    in the same process (other settings) must not inherit the 1 and run its model on one core."""
    global _TORCH_DEFAULT_THREADS
    if _TORCH_DEFAULT_THREADS is None:
        import torch

        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
    return _TORCH_DEFAULT_THREADS


def checkpoint_path(settings: Settings) -> Path:
    """The checkpoint a worker serves: ``STYLETAG_MODEL``, else the shipped default."""
    if settings.model_path:
        return Path(settings.model_path)
    from model.weights import DEFAULT_CHECKPOINT

    return Path(DEFAULT_CHECKPOINT)


def get_context(settings: Settings | None = None) -> WorkerContext:
    """The process-wide context (one model per process)."""
    global _context
    with _lock:
        if _context is None or (settings is not None and settings != _context.settings):
            settings = settings or Settings.from_env()
            _context = WorkerContext(settings, device=settings.device or None)
        return _context


def reset_context() -> None:
    global _context
    with _lock:
        _context = None
