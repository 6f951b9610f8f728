"""Everything a tagging process holds once: settings, the loaded models, the image reader, label ids.

Built lazily, once per process (in a Celery pool child after the fork, or in the inline CLI), so
the parent that forks never imports torch or touches CUDA.

Which model serves what is the registry's call (``catalog.models``): a bulk task runs with its run's
model, uploads with the active model of the served taxonomy (:func:`served_taxonomy`: that of
``STYLETAG_MODEL``; without it, that of the one taxonomy whose model a person activated; else the shipped
checkpoint's, which is also the bootstrap of an empty registry). A context keeps the
last :data:`MAX_MODELS` models it loaded (an LRU), so switching between an old and a new model during an
activation or a shadow run does not reload each time. A model that cannot be loaded is a
:class:`ModelUnavailable` (transient: the task is retried, never written with another model).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from catalog.errors import ConfigError, ServiceUnavailable
from catalog.settings import Settings, usable_cores

log = logging.getLogger("styletag.worker")

MAX_MODELS = 2

_lock = threading.Lock()
_context: WorkerContext | None = None


class SeveralTaxonomies(ConfigError):
    """Models of several taxonomies were activated and ``STYLETAG_MODEL`` does not say which one is served."""


class ModelUnavailable(ServiceUnavailable):
    """The model a task needs cannot be loaded here (file missing or modified, registry entry without a
    path): the task waits and retries; nothing is written with another model."""


@dataclass
class LoadedModel:
    version: str
    predictor: object  # model.predictor.Predictor
    path: Path
    labels: object = None  # catalog.labels.LabelMap, once synced with the catalog


@dataclass
class WorkerContext:
    settings: Settings
    device: str | None = None
    # CPU inference: how many threads run the model at once, each on its own slice of the batch with
    # one intra-op thread (see Pipeline.predict). 1 on a GPU.
    model_threads: int = field(default=1, init=False)
    _models: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _by_path: dict = field(default_factory=dict, init=False, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _taxonomy: str | None = field(default=None, init=False, repr=False)
    _threads_set: bool = field(default=False, init=False, repr=False)
    _decode_pool: object = field(default=None, init=False, repr=False)  # worker.decode_pool.DecodePool
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- loading ------------------------------------------------------------------------------------
    def _load_file(self, path: Path, version: str | None = None) -> LoadedModel:
        """Load a checkpoint file (verified: model.checkpoint refuses a modified file) into the LRU."""
        from model.errors import CheckpointError
        from model.predictor import Predictor

        try:
            predictor = Predictor.from_checkpoint(path, device=self.device, batch_size=self.settings.batch_size)
        except CheckpointError as exc:
            raise ModelUnavailable(f"model {version or path} cannot be loaded: {exc}") from None
        if version is not None and predictor.model_version != version:
            raise ModelUnavailable(f"{path} holds model {predictor.model_version}, not the registered {version}; "
                                   "register the file again or restore the registered checkpoint")
        self._configure_threads(predictor)
        if not predictor.spec.is_legacy:  # a photo model: its colour tables now, not in the first batch
            from model.colour import warm_tables

            warm_tables(names=predictor.colours is not None)
            # and its decoder processes, so that the first upload does not wait for them to start
            pool = self.decode_pool(predictor.spec, colour_names=predictor.colours is not None)
            if pool is not None:
                pool.start()
        loaded = LoadedModel(predictor.model_version, predictor, path)
        log.info(
            "model loaded: version=%s backbone=%s device=%s input=%dpx model_threads=%d",
            predictor.model_version, predictor.backbone, predictor.device, predictor.input_size, self.model_threads,
        )
        self._remember(loaded)
        return loaded

    def _remember(self, loaded: LoadedModel) -> None:
        self._models[loaded.version] = loaded
        self._models.move_to_end(loaded.version)
        while len(self._models) > MAX_MODELS:
            old, gone = self._models.popitem(last=False)
            self._by_path = {k: v for k, v in self._by_path.items() if v != old}
            log.info("model unloaded: version=%s", gone.version)

    def _configure_threads(self, predictor) -> None:
        if self._threads_set:
            return
        import torch

        threads = self.settings.torch_threads
        if predictor.device.type == "cpu":
            # Split each batch over N threads with one intra-op thread each, instead of one call with N
            # intra-op threads: torch's per-operator barriers stall whenever the OS preempts one of its
            # threads (decode threads, the database, a neighbour), which on a shared or small machine
            # cost 2x at batch 256 and 10x on small upload batches (docs/performance.md).
            self.model_threads = threads or _default_torch_threads()
            torch.set_num_threads(1)
        elif threads > 0:
            torch.set_num_threads(threads)
        self._threads_set = True

    def _with_labels(self, loaded: LoadedModel) -> LoadedModel:
        if loaded.labels is None:
            from catalog.db import session_scope
            from catalog.labels import label_map, sync_colour_labels, sync_labels

            taxonomy = loaded.predictor.taxonomy
            colours = getattr(loaded.predictor, "colours", None)  # model.predictor.ColourTagging or None
            with session_scope(self.settings.database_url) as session:
                labels = sync_labels(session, taxonomy)
                if colours is not None and any(("colour", n) not in labels.by_name for n in colours.palette):
                    # the palette's names become the taxonomy's colour labels (added, never removed)
                    sync_colour_labels(session, taxonomy.name, list(colours.palette))
                    labels = label_map(session, taxonomy.name, expect=taxonomy)
                loaded.labels = labels
        return loaded

    def model(self, version: str | None = None) -> LoadedModel:
        """The model ``version`` (default: the active model of this worker's taxonomy) with its label ids,
        loaded once by the path the registry records for it."""
        version = version or self.active_version()
        with self._load_lock:
            loaded = self._models.get(version)
            if loaded is not None:
                self._models.move_to_end(version)
                return self._with_labels(loaded)
            from catalog.db import session_scope
            from catalog.models import RegistryError, get_model, resolve_path

            with session_scope(self.settings.database_url) as session:
                record = get_model(session, version)
            if record.path:
                try:
                    path = resolve_path(record.path)
                except RegistryError as exc:
                    raise ModelUnavailable(str(exc)) from None
            elif version == self._configured_version():
                path = checkpoint_path(self.settings)
            else:
                raise ModelUnavailable(f"model {version} has no path in the registry; register its checkpoint "
                                       "('styletag model register PATH')")
            return self._with_labels(self._load_file(path, version))

    def _configured_version(self) -> str | None:
        from model.errors import CheckpointError
        from model.metadata import CheckpointMeta

        try:
            return CheckpointMeta.read(checkpoint_path(self.settings)).model_version
        except CheckpointError:
            return None

    # -- the registry ---------------------------------------------------------------------------------
    def _configured_taxonomy(self) -> str:
        if self._taxonomy is None:
            self._taxonomy = configured_meta(self.settings).taxonomy.name
        return self._taxonomy

    @property
    def taxonomy(self) -> str:
        """The taxonomy this worker serves uploads for (:func:`served_taxonomy`, read from the registry
        each time: an activation of a shop's own taxonomy is followed without a restart)."""
        from catalog.db import session_scope

        with session_scope(self.settings.database_url) as session:
            return served_taxonomy(self.settings, session, configured=self._configured_taxonomy())

    def active_version(self) -> str:
        """The active model of the served taxonomy (two small queries; bootstraps an empty registry)."""
        from catalog.db import session_scope
        from catalog.models import active_model

        with session_scope(self.settings.database_url) as session:
            taxonomy = served_taxonomy(self.settings, session, configured=self._configured_taxonomy())
            record = active_model(session, taxonomy)
        if record is not None:
            return record.version
        return ensure_serving(self.settings).version

    # -- what the configured checkpoint gives (bench, tools, the first load) ----------------------------
    @property
    def predictor(self):
        """The configured checkpoint's predictor (``STYLETAG_MODEL`` or the shipped default)."""
        return self._configured().predictor

    @property
    def labels(self):
        """Label ids of the configured model's taxonomy (created in the catalog when new); makes sure the
        registry has an active model for that taxonomy (bootstrap)."""
        loaded = self._configured()
        ensure_serving(self.settings)
        with self._load_lock:
            return self._with_labels(loaded).labels

    def _configured(self) -> LoadedModel:
        path = checkpoint_path(self.settings)
        with self._load_lock:
            version = self._by_path.get(path)
            if version is not None and version in self._models:
                return self._models[version]
            loaded = self._load_file(path)
            self._by_path[path] = loaded.version
            return loaded

    def decode_pool(self, spec, *, colour_names: bool = True):
        """This process's decoder processes for ``spec`` (``worker.decode_pool``; started on first use), or None
        when images are decoded on the fetch threads: ``STYLETAG_DECODE_PROCS`` 0, or its default (-1) with a
        28 px model, whose decode (~0.1 ms) costs less than handing the bytes to another process. The default
        for a photo model is the host's cores divided by the worker processes ``styletag worker`` started on
        it (``STYLETAG_HOST_PROCS``), so that a host with 8 GPUs x 4 bulk processes does not start 32 x 16."""
        procs = self.settings.decode_procs
        if procs < 0:  # the host's cores, shared by the worker processes the launcher started on it
            procs = 0 if spec is None or spec.is_legacy else max(1, usable_cores() // self.settings.host_procs)
        if procs == 0:
            return None
        with self._pool_lock:
            if self._decode_pool is None:
                from worker.decode_pool import DecodePool

                self._decode_pool = DecodePool(procs, colour_names=colour_names)
            return self._decode_pool

    def close(self) -> None:
        """Stop this process's decoder processes (they also exit by themselves when it is gone)."""
        pool, self._decode_pool = self._decode_pool, None
        if pool is not None:
            pool.close()

    @property
    def loaded_versions(self) -> list[str]:
        return list(self._models)

    @property
    def reader(self):
        if not hasattr(self, "_reader"):
            from catalog.storage import ImageReader

            self._reader = ImageReader(self.settings.allowed_image_prefixes, self.settings.max_image_bytes)
        return self._reader


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
    """The configured checkpoint: ``STYLETAG_MODEL``, else the shipped default. It names the worker's
    taxonomy and bootstraps an empty registry; the registry decides what is served."""
    if settings.model_path:
        return Path(settings.model_path)
    from model.weights import DEFAULT_CHECKPOINT

    return Path(DEFAULT_CHECKPOINT)


def configured_meta(settings: Settings):
    """The configured checkpoint's metadata (no torch); a missing or malformed file is a ConfigError."""
    from catalog.errors import ConfigError
    from model.errors import CheckpointError
    from model.metadata import CheckpointMeta

    try:
        return CheckpointMeta.read(checkpoint_path(settings))
    except CheckpointError as exc:
        raise ConfigError(f"model {exc}; set STYLETAG_MODEL to a .safetensors checkpoint") from None


def served_taxonomy(settings: Settings, session, *, configured: str | None = None) -> str:
    """The taxonomy this deployment serves: that of ``STYLETAG_MODEL`` when it is set; else that of the one
    taxonomy whose active model a person activated (``styletag model activate``, ``register --activate``);
    else the shipped checkpoint's (the bootstrap). Models of several taxonomies activated and no
    ``STYLETAG_MODEL`` is a ConfigError: which one uploads and retags serve is the shop's call."""
    from catalog.models import chosen_taxonomies

    configured = configured or configured_meta(settings).taxonomy.name
    if settings.model_path:
        return configured
    chosen = chosen_taxonomies(session)
    if len(chosen) > 1:
        raise SeveralTaxonomies(f"models of several taxonomies are active ({', '.join(chosen)}); set STYLETAG_MODEL to "
                          "a checkpoint of the taxonomy this deployment serves")
    return chosen[0] if chosen else configured


def ensure_serving(settings: Settings, *, verify: bool = True):
    """The active model (a ``catalog.models.ModelRecord``) of the served taxonomy (:func:`served_taxonomy`).
    On an empty registry the configured checkpoint is verified (weights and metadata against its version,
    with torch, unless ``verify`` is False) and then registered and activated (activated_by "bootstrap")."""
    from catalog.db import session_scope
    from catalog.labels import sync_labels
    from catalog.models import active_model, ensure_active

    meta = configured_meta(settings)
    with session_scope(settings.database_url) as session:
        taxonomy = served_taxonomy(settings, session, configured=meta.taxonomy.name)
        record = active_model(session, taxonomy)
        if record is not None:
            if taxonomy == meta.taxonomy.name:
                sync_labels(session, meta.taxonomy)
            return record
    if verify:
        from model.checkpoint import load_checkpoint

        load_checkpoint(checkpoint_path(settings))  # a modified file is refused before it is registered
    with session_scope(settings.database_url) as session:
        return ensure_active(session, checkpoint_path(settings))


def preflight(settings: Settings) -> str:
    """Check, without torch, that this worker has a model to serve before it consumes anything: the
    configured checkpoint is readable, and the active model of the served taxonomy has a readable checkpoint of
    the registered version. Raises ModelUnavailable (or ConfigError); returns a one-line description.
    When the database cannot be reached, only the configured checkpoint is checked (tasks retry on
    database errors anyway)."""
    from sqlalchemy.exc import DBAPIError

    from catalog.db import session_scope
    from catalog.models import RegistryError, active_model, resolve_path
    from model.errors import CheckpointError
    from model.metadata import CheckpointMeta

    meta = configured_meta(settings)
    try:
        with session_scope(settings.database_url) as session:
            record = active_model(session, served_taxonomy(settings, session, configured=meta.taxonomy.name))
    except DBAPIError as exc:
        log.warning("model preflight: database unavailable (%s); checked the configured checkpoint only",
                    str(getattr(exc, "orig", exc)).splitlines()[0][:200])
        return f"configured model {meta.model_version} (registry not reachable)"
    if record is None:
        return f"configured model {meta.model_version} (bootstrap of an empty registry)"
    try:
        path = resolve_path(record.path) if record.path else checkpoint_path(settings)
        have = CheckpointMeta.read(path).model_version
    except (CheckpointError, RegistryError) as exc:
        raise ModelUnavailable(f"active model {record.version} of taxonomy {record.taxonomy!r} cannot be loaded: "
                               f"{exc}") from None
    if have != record.version:
        raise ModelUnavailable(f"active model {record.version}: {path} holds model {have}; restore the registered "
                               "checkpoint or activate another model")
    return f"active model {record.version} ({path})"


def get_context(settings: Settings | None = None) -> WorkerContext:
    """The process-wide context."""
    global _context
    with _lock:
        if _context is None or (settings is not None and settings != _context.settings):
            if _context is not None:
                _context.close()
            settings = settings or Settings.from_env()
            _context = WorkerContext(settings, device=settings.device or None)
        return _context


def reset_context() -> None:
    global _context
    with _lock:
        if _context is not None:
            _context.close()
        _context = None
