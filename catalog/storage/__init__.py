"""Object storage for product images: one backend protocol, chosen by URI scheme.

* ``file:///abs/path`` (:mod:`.files`), ``s3://bucket/key`` (:mod:`.s3`) and ``https://host/path``
  (:mod:`.https`; ``http://`` only where an allowed prefix names it) are the backends; :mod:`.registry`
  maps a scheme to its backend, :mod:`.uri` holds the URI rules (parse, normalise, prefix check).
* A :class:`Store` (:mod:`.stores`) is *our* bucket or folder, where importers put images
  (``put``, ``put_if_changed``); ``open_store(url, settings)`` picks it by URL.
* An :class:`ImageReader` (:mod:`.reader`) reads arbitrary catalog image URIs for the workers and is
  the security boundary: every URI is checked against ``STYLETAG_ALLOWED_IMAGE_PREFIXES``, objects over
  the size limit are refused, and every failure is a typed :class:`~catalog.errors.StorageError`.
  Workers build it with ``ImageReader.from_settings(settings)``.

Configuration comes from :class:`catalog.settings.Settings` only; nothing here reads the environment.

Versions. Every backend reports a version string that changes whenever the bytes behind a URI change,
and ``head(uri)`` gives the same string as ``fetch(uri)`` of the same bytes (``Fetched.version``):

* S3: the ETag of the GET or HEAD response, unquoted (the MD5 of the bytes for a simple put).
* files: ``f"{size}-{mtime_ns}"`` from ``fstat`` of the very descriptor that is read (a read that sees the
  file change under it reads again). ``Store.put`` returns the version the file will report, and moves
  the mtime on by 1 ns when a new file would otherwise repeat the old one's size and timestamp. A file
  rewritten in place by another program, to the same size within one tick of the file system's clock,
  keeps its version: write through the store, or replace files by rename.
* https: the ``ETag`` header (``W/`` kept for a weak one), else ``f"{length}-{Last-Modified}"``, else
  ``"sha256:" + sha256(body)`` (then ``head`` GETs the body). Longer than 96 characters: hashed.

Versions of different backends are not comparable: a photo moved to another backend is a new version.
"""

from __future__ import annotations

from catalog.storage.files import FileBackend
from catalog.storage.https import HttpBackend
from catalog.storage.reader import ImageReader
from catalog.storage.registry import Backend, Fetched, ObjectInfo, WritableBackend, register
from catalog.storage.s3 import S3Backend, reset_s3_client, s3_client
from catalog.storage.stores import FileStore, S3Store, Store, head_location, open_store, read_location
from catalog.storage.uri import MAX_URI_LENGTH, Location, check_uri, parse_uri

register(FileBackend)
register(S3Backend)
register(HttpBackend)

__all__ = [
    "MAX_URI_LENGTH", "Backend", "Fetched", "FileBackend", "FileStore", "HttpBackend", "ImageReader",
    "Location", "ObjectInfo", "S3Backend", "S3Store", "Store", "WritableBackend", "check_uri",
    "head_location", "open_store", "parse_uri", "read_location", "register", "reset_s3_client", "s3_client",
]
