"""``file://`` objects: reads confined to the allowed folders, even while someone swaps their contents.

A path is resolved (``realpath``) and must lie under the real path of an allowed folder; it is then
opened *beneath that folder's descriptor with no symlink anywhere on the way* — ``openat2`` with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` where the kernel has it (Linux 5.6+), else one ``openat``
per component with ``O_NOFOLLOW``. A directory swapped for a symlink between the check and the open
(``renameat2(RENAME_EXCHANGE)``) therefore fails the open instead of leading the read outside.
Size, type and version come from ``fstat`` of the descriptor that is read: what is checked is what is read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
from collections.abc import Sequence

from catalog.errors import ForbiddenURI, ObjectMissing, StorageError, TransientStorageError
from catalog.storage import uri as uris
from catalog.storage.registry import Fetched, ObjectInfo, too_large
from catalog.storage.uri import Location

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x04, 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (the unified syscall table)

# Errors of a local or network file system that may go away; any other error is about the path itself
# (too long, a symlink loop, ...) and retrying it would only delay the batch.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE,
                    errno.ENFILE, errno.ENOMEM, errno.EBUSY, errno.ENOLCK}


def file_version(st: os.stat_result) -> str:
    """Size and modification time (ns) of an open file: both change when its bytes are replaced."""
    return f"{st.st_size}-{st.st_mtime_ns}"


def outside(uri: str) -> ForbiddenURI:
    return ForbiddenURI(f"image URI {uri[:200]!r} resolves (through a symlink) outside the allowed prefixes")


def file_error(exc: OSError, uri: str) -> StorageError:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return ObjectMissing(f"no object at {uri[:200]}")
    if isinstance(exc, PermissionError):
        return StorageError(f"permission denied reading {uri[:200]}")
    if exc.errno == errno.ELOOP:
        return ForbiddenURI(f"image URI {uri[:200]!r} became a symlink while being read")
    if exc.errno == errno.EXDEV:
        return outside(uri)
    if exc.errno == errno.ENAMETOOLONG:
        return ForbiddenURI(f"image URI {uri[:200]!r} names no readable file: {exc.strerror}")
    if exc.errno in TRANSIENT_ERRNOS:
        return TransientStorageError(f"cannot read {uri[:200]}: {exc.strerror or exc.__class__.__name__}")
    return StorageError(f"cannot read {uri[:200]}: {exc.strerror or exc.__class__.__name__}")


# --- opening beneath a folder ----------------------------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()


def openat2_beneath(dir_fd: int, rel: str, flags: int) -> int:
    """``openat2(dir_fd, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``; OSError as os.open raises."""
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
    path = os.fsencode(rel)
    for _ in range(3):  # EAGAIN: a rename raced the lookup; the kernel asks us to try again
        fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dir_fd), ctypes.c_char_p(path),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise OSError(err, os.strerror(err), rel)


def walk_beneath(dir_fd: int, rel: str, flags: int) -> int:
    """The same, one component at a time: every directory opened with ``O_NOFOLLOW | O_DIRECTORY``
    relative to the one before, the file with ``O_NOFOLLOW``."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EXDEV, "path leaves its folder", rel)
    cur = dir_fd
    try:
        for part in parts[:-1]:
            nxt = _open_component(part, _DIR_FLAGS | os.O_NOFOLLOW, cur)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return _open_component(parts[-1], flags | os.O_NOFOLLOW, cur)
    finally:
        if cur != dir_fd:
            os.close(cur)


def _open_component(name: str, flags: int, dir_fd: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):  # a symlink, or not a directory
            try:
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symlink on the way", name) from None
            except FileNotFoundError:
                pass
        raise


def _probe_openat2() -> bool:
    if _syscall is None:
        return False
    try:
        root = os.open("/", _DIR_FLAGS)
    except OSError:
        return False
    try:
        os.close(openat2_beneath(root, ".", _DIR_FLAGS))
        return True
    except OSError:  # ENOSYS (old kernel, seccomp), EINVAL (flags unknown), EPERM
        return False
    finally:
        os.close(root)


HAVE_OPENAT2 = _probe_openat2()


# --- the backend ----------------------------------------------------------------------------------------


class FileBackend:
    """Reads and writes confined to ``roots``: folder paths (the allowed prefixes, or a store's root)."""

    schemes = ("file",)
    syntax = staticmethod(uris.local_path)

    def __init__(self, roots: Sequence[str] = (), *, use_openat2: bool | None = None):
        self.roots = tuple(os.path.realpath(r) for r in roots)
        self.use_openat2 = HAVE_OPENAT2 if use_openat2 is None else (use_openat2 and HAVE_OPENAT2)
        self._made_dirs: set[str] = set()  # skip a mkdir syscall per put on bulk imports

    @classmethod
    def from_settings(cls, settings) -> FileBackend:
        prefixes = uris.parse_prefixes(settings.allowed_image_prefixes)
        return cls([p.path for p in prefixes if p.scheme == "file"])

    # -- reading
    def _open(self, loc: Location) -> int:
        # The common case without realpath's per-component lstat calls in Python: a path that lies beneath a
        # root as written, opened with no symlink allowed on the way (the kernel checks that). A symlink on
        # the way (ELOOP, ENOTDIR) or a ".." takes the resolving route below, which decides as before.
        if "/.." not in loc.path and "/./" not in loc.path and "//" not in loc.path:
            root = self._root_of(loc.path)
            rel = loc.path[len(root):].lstrip("/") if root is not None else ""
            if rel:
                try:
                    return self._open_beneath(root, rel)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EMLINK):
                        raise
        real = os.path.realpath(loc.path)
        root = self._root_of(real)
        if root is None:
            raise outside(loc.uri)
        rel = real[len(root):].lstrip("/")
        if not rel:  # the prefix names this very file (or folder)
            return os.open(real, _READ_FLAGS)
        return self._open_beneath(root, rel)

    def _root_of(self, path: str) -> str | None:
        """The longest root that ``path`` lies beneath (as given: resolve it first where that matters)."""
        probe = Location(uri="", scheme="file", path=path)
        roots = [r for r in self.roots if uris.under(probe, Location(uri="", scheme="file", path=r))]
        return max(roots, key=len) if roots else None

    def _open_beneath(self, root: str, rel: str) -> int:
        """``rel`` opened beneath the folder ``root`` with no symlink followed on the way."""
        dir_fd = os.open(root, _DIR_FLAGS)
        try:
            opener = openat2_beneath if self.use_openat2 else walk_beneath
            return opener(dir_fd, rel, _READ_FLAGS)
        finally:
            os.close(dir_fd)

    def _open_regular(self, loc: Location) -> tuple[int, os.stat_result]:
        try:
            fd = self._open(loc)
        except OSError as exc:
            raise file_error(exc, loc.uri) from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise file_error(exc, loc.uri) from None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ForbiddenURI(
                f"image URI {loc.uri[:200]!r} is not a regular file (directory, FIFO or device)")
        return fd, st

    def head(self, loc: Location) -> ObjectInfo:
        fd, st = self._open_regular(loc)
        os.close(fd)
        return ObjectInfo(size=st.st_size, version=file_version(st))

    def read(self, loc: Location, max_bytes: int | None) -> Fetched:
        """Read at most ``max_bytes + 1`` bytes; if the file changed while being read (its size or
        mtime moved), read it again, so that the version is the version of the bytes returned."""
        fd, st = self._open_regular(loc)
        try:
            for _ in range(3):
                if max_bytes is not None and st.st_size > max_bytes:
                    raise too_large(loc.uri, st.st_size, max_bytes)
                data = _read_all(fd, None if max_bytes is None else max_bytes + 1)
                if max_bytes is not None and len(data) > max_bytes:  # it grew past the limit
                    raise too_large(loc.uri, len(data), max_bytes)
                after = os.fstat(fd)
                if file_version(after) == file_version(st) and len(data) == st.st_size:
                    return Fetched(data, file_version(st))
                st = after
                os.lseek(fd, 0, os.SEEK_SET)
            raise TransientStorageError(f"{loc.uri[:200]} kept changing while being read; retry later")
        except OSError as exc:
            raise file_error(exc, loc.uri) from None
        finally:
            os.close(fd)

    # -- our own store
    def matches(self, loc: Location, data: bytes) -> ObjectInfo | None:
        try:
            fetched = self.read(loc, len(data))
        except (ObjectMissing, StorageError):
            return None
        return ObjectInfo(len(data), fetched.version) if fetched.data == data else None

    def put(self, loc: Location, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Write atomically (temp file + rename) so that a reader never sees half an image. The new file's
        version is what ``head`` will report; should it equal the replaced file's (same size, same clock
        tick), its mtime is moved on by 1 ns, so that a new photo always gets a new version."""
        path = loc.path
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if parent not in self._made_dirs:
                os.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            try:
                old = file_version(os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                old = None
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                st = os.fstat(fd)
                if file_version(st) == old:
                    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
                    st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            why = exc.strerror or exc.__class__.__name__
            raise StorageError(f"cannot write {loc.uri[:200]}: {why}") from None
        return ObjectInfo(size=st.st_size, version=file_version(st))


def _read_all(fd: int, limit: int | None) -> bytes:
    chunks, left = [], limit
    while left is None or left > 0:
        chunk = os.read(fd, 1 << 20 if left is None else min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        if left is not None:
            left -= len(chunk)
    return b"".join(chunks)
