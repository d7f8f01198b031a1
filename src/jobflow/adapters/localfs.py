"""A folder on disk as the object store: the embedded default for one host.

Layout of the folder::

    <root>/<key>                                 the object's bytes, a plain file
    <root>/.jobflow/meta/<sha256(key)>-<inode>.json  what S3 would report about it
    <root>/.jobflow/tmp/                         writes in progress

A write streams into ``tmp``, is fsync'ed, gets its metadata file (named
after the new file's inode), and becomes visible with a single
``os.replace`` onto ``<root>/<key>``: readers see the old object or the new
one, never a partial one. The metadata file carries the content type, the
ETag (MD5 in quotes, like S3), the SHA-256 and a fresh random version id per
write, so an object replaced with identical bytes is still seen as replaced.
A file in the folder without matching metadata (copied in by hand, or
modified in place) is not an object: ``head`` reports nothing.

The ``.jobflow`` folder is also the store's marker. "No object" is an answer
only the folder itself can give: when the root is gone (renamed away, an
unmounted volume whose empty mount point remains), is not a folder, cannot be
read, or has lost its ``.jobflow`` folder, every call raises
:class:`~jobflow.errors.StorageUnavailable` instead, never "no object" or
"object changed", and writes create nothing in the wrong place. Only the
constructor creates the marker.

Keys never escape the folder: :func:`jobflow.keys.check_key` refuses
absolute keys and ``..``, the ``.jobflow`` name is reserved, and every
directory is opened relative to its parent with ``O_NOFOLLOW``, so a
symbolic link anywhere on the way is refused rather than followed. This
needs a POSIX system (Linux, macOS).

Clients upload with :func:`deliver` (what ``jobflow`` tools do with a
``file://`` upload ticket), or the host app writes with :meth:`~LocalObjectStore.put`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from jobflow.checksums import SHA256_HEADER, sha256_base64_to_hex, sha256_hex_to_base64
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    ObjectChanged,
    StoragePermissionDenied,
    StorageUnavailable,
)
from jobflow.keys import check_key
from jobflow.models import ObjectInfo, PresignedUpload

#: The folder's own bookkeeping lives here; no key may use this name.
STATE_DIR = ".jobflow"
_META = (STATE_DIR, "meta")
_TMP = (STATE_DIR, "tmp")
_CHUNK = 1024 * 1024
_METADATA_FORMAT = 1

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(
    os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO someone left in the folder must not hang a read.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(
    os, "O_NONBLOCK", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(
    os, "O_CLOEXEC", 0)


def _supports_dir_fd() -> bool:
    return (os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd
            and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY"))


class UploadRequest(Protocol):
    """What :func:`deliver` needs from an upload ticket or a presigned upload."""

    @property
    def method(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def headers(self) -> dict[str, str]: ...


class LocalObjectStore:
    """An :class:`~jobflow.ports.ObjectStore` in a folder on disk.

    ``root`` is created if missing (unless ``create=False``: a command that only
    looks leaves no folder behind). ``bucket`` names the store in job records
    (default: the folder's name). Safe for threads and for several processes
    on one host; not for network filesystems without atomic rename.
    """

    def __init__(self, root: str | os.PathLike[str], *, bucket: str | None = None,
                 create: bool = True) -> None:
        if not _supports_dir_fd():
            raise ConfigurationError("LocalObjectStore needs a POSIX system (openat, O_NOFOLLOW)")
        self._write_lock = threading.Lock()
        try:
            self._root = Path(root).resolve()
            self._bucket = bucket or self._root.name or "local"
            if not create and not self._root.exists():
                return  # a command that only looks: leave no folder behind
            self._root.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise StoragePermissionDenied(
                f"cannot create the object folder {root}: permission denied") from exc
        except OSError as exc:
            raise ConfigurationError(f"cannot use {root} as the object folder: {exc}") from exc
        try:
            with self._fs_errors("prepare", str(self._root)):
                root_fd = os.open(self._root, _DIR_FLAGS)
                try:
                    with suppress(FileExistsError):
                        os.mkdir(STATE_DIR, dir_fd=root_fd)  # the marker (see above)
                finally:
                    os.close(root_fd)
                for parts in (_META, _TMP):
                    os.close(self._open_dir(parts, create=True))
        except InvalidInput as exc:
            raise ConfigurationError(f"cannot use {root} as the object folder: {exc}") from exc

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def root(self) -> Path:
        """The folder, as an absolute path with no symbolic links."""
        return self._root

    def path_of(self, key: str) -> Path:
        """Where the object for ``key`` lives (after the key has been checked)."""
        return self._root.joinpath(*_key_parts(key))

    # -- uploads ---------------------------------------------------------------------

    def presign_upload(self, key: str, *, content_type: str, expires_in: int,
                       min_bytes: int, max_bytes: int, sha256: str | None = None
                       ) -> PresignedUpload:
        """A ``file://`` PUT target for :func:`deliver`, with S3-style headers.

        A local target needs no signature (whoever can write the folder can
        write the object) and does not expire; the job's upload deadline and
        the checks on ``complete_upload`` still apply.
        """
        headers = {"Content-Type": content_type}
        if sha256 is not None:
            headers[SHA256_HEADER] = sha256_hex_to_base64(sha256)
        return PresignedUpload(method="PUT", url=self.path_of(key).as_uri(), headers=headers)

    def deliver(self, upload: UploadRequest, data: bytes | BinaryIO) -> ObjectInfo:
        """Perform a ``file://`` upload into this folder, as an HTTP client would for S3.

        The ``Content-Type`` header becomes the object's content type. When
        the upload carries an ``x-amz-checksum-sha256`` header, data that does
        not match it is refused (:class:`~jobflow.errors.InvalidInput`) and
        nothing is written, as S3 refuses a PUT with a bad checksum.
        """
        if upload.method.upper() != "PUT":
            raise InvalidInput(f"a local upload is a PUT, not {upload.method!r}")
        key = self._key_of_url(upload.url)
        headers = {name.lower(): value for name, value in upload.headers.items()}
        content_type = headers.get("content-type")
        if not content_type:
            raise InvalidInput("the upload has no Content-Type header")
        declared = headers.get(SHA256_HEADER)
        expected_sha256 = sha256_base64_to_hex(declared) if declared is not None else None
        if declared is not None and expected_sha256 is None:
            raise InvalidInput(f"{SHA256_HEADER} must be the base64 of a SHA-256 digest")
        return self._write(key, _chunks_of(data), content_type=content_type,
                           expected_sha256=expected_sha256)

    # -- reads -----------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        opened = self._open_object(key)
        if opened is None:
            return None
        fd, info = opened
        os.close(fd)
        return info

    def open(self, key: str, *, expected: ObjectInfo | None = None) -> BinaryIO:
        """A stream of exactly the object ``expected`` describes.

        The file is opened first and its metadata checked afterwards, so the
        stream keeps reading that very file even if the key is replaced
        meanwhile.
        """
        opened = self._open_object(key)
        if opened is None:
            raise ObjectChanged(key, f"object {key} no longer exists")
        fd, info = opened
        if expected is not None and (info.version_id != expected.version_id
                                     or info.etag != expected.etag):
            os.close(fd)
            raise ObjectChanged(key)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def download(self, key: str, dest: Path, *, expected: ObjectInfo | None = None) -> Path:
        with self.open(key, expected=expected) as stream:
            return write_file_atomically(Path(dest), stream)

    # -- writes ----------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        return self._write(key, _chunks_of(data), content_type=content_type)

    def delete(self, key: str) -> None:
        parts = _key_parts(key)
        with self._write_lock, self._fs_errors("delete", key):
            try:
                parent = self._open_dir(parts[:-1], create=False)
            except (FileNotFoundError, NotADirectoryError):
                return
            try:
                entry = _entry(parent, parts[-1], key)
                if entry is None or not stat.S_ISREG(entry.st_mode):
                    return
                try:
                    os.unlink(parts[-1], dir_fd=parent)
                except FileNotFoundError:
                    return
                os.fsync(parent)
            finally:
                os.close(parent)
            self._remove_metadata(key, entry.st_ino)

    # -- internals -------------------------------------------------------------------

    def _write(self, key: str, chunks: Iterable[bytes], *, content_type: str,
               expected_sha256: str | None = None) -> ObjectInfo:
        parts = _key_parts(key)
        if not isinstance(content_type, str) or not content_type:
            raise InvalidInput("content_type must be a non-empty string")
        temp_name = f"{uuid.uuid4().hex}.part"
        metadata_name: str | None = None
        committed = False
        with self._fs_errors("write", key):
            tmp_dir = self._open_dir(_TMP, create=False)
            meta_dir = self._open_dir(_META, create=False)
            try:
                # Streaming needs no lock: the temporary file is ours alone.
                size, md5, sha256, identity = _write_temp(tmp_dir, temp_name, chunks)
                if expected_sha256 is not None and sha256 != expected_sha256:
                    raise InvalidInput(
                        "the data does not match the SHA-256 declared for this upload; "
                        "nothing was written")
                info = ObjectInfo(key=key, size=size, content_type=content_type,
                                  etag=f'"{md5}"', version_id=uuid.uuid4().hex, sha256=sha256)
                metadata_name = _metadata_name(key, identity.st_ino)
                with self._write_lock:
                    _write_json(meta_dir, metadata_name, _metadata_record(info, identity),
                                tmp_dir)
                    previous, parent = self._publish(parts, key, tmp_dir, temp_name)
                    committed = True
                    try:
                        os.fsync(parent)
                    finally:
                        os.close(parent)
                    if previous is not None and previous.st_ino != identity.st_ino:
                        self._remove_metadata(key, previous.st_ino, meta_dir=meta_dir)
                return info
            finally:
                if not committed:
                    _unlink_quietly(tmp_dir, temp_name)
                    if metadata_name is not None:
                        _unlink_quietly(meta_dir, metadata_name)
                os.close(tmp_dir)
                os.close(meta_dir)

    def _publish(self, parts: list[str], key: str, tmp_dir: int,
                 temp_name: str) -> tuple[os.stat_result | None, int]:
        """Rename the finished file onto the key: the single step that publishes it.

        Returns what the key held before (None if nothing) and the open
        descriptor of the key's folder, for the caller to fsync and close.
        """
        parent = self._open_dir(parts[:-1], create=True)
        try:
            previous = _entry(parent, parts[-1], key)
            if previous is not None and not stat.S_ISREG(previous.st_mode):
                raise InvalidInput(f"object key {key[:80]!r} names a folder of other objects")
            os.replace(temp_name, parts[-1], src_dir_fd=tmp_dir, dst_dir_fd=parent)
        except BaseException:
            os.close(parent)
            raise
        return previous, parent

    def _open_object(self, key: str) -> tuple[int, ObjectInfo] | None:
        """An open descriptor of the object's file and its metadata, or None."""
        parts = _key_parts(key)
        with self._fs_errors("read", key):
            try:
                parent = self._open_dir(parts[:-1], create=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
            except (FileNotFoundError, NotADirectoryError):
                return None
            finally:
                os.close(parent)
            try:
                identity = os.fstat(fd)
                info = self._read_metadata(key, identity) if stat.S_ISREG(
                    identity.st_mode) else None
            except BaseException:
                os.close(fd)
                raise
            if info is None:
                os.close(fd)
                return None
            return fd, info

    def _read_metadata(self, key: str, identity: os.stat_result) -> ObjectInfo | None:
        meta_dir = self._open_dir(_META, create=False)
        try:
            fd = os.open(_metadata_name(key, identity.st_ino), _READ_FLAGS, dir_fd=meta_dir)
        except FileNotFoundError:
            return None
        finally:
            os.close(meta_dir)
        with os.fdopen(fd, "rb") as stream:
            raw = stream.read()
        try:
            record = json.loads(raw)
            matches = (record["format"] == _METADATA_FORMAT and record["key"] == key
                       and record["inode"] == identity.st_ino
                       and record["size"] == identity.st_size
                       and record["mtime_ns"] == identity.st_mtime_ns)
            if not matches:
                return None
            return ObjectInfo(key=key, size=int(record["size"]),
                              content_type=str(record["content_type"]), etag=str(record["etag"]),
                              version_id=str(record["version_id"]), sha256=str(record["sha256"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable metadata: the store cannot vouch for this file

    def _remove_metadata(self, key: str, inode: int, *, meta_dir: int | None = None) -> None:
        own = meta_dir is None
        fd = self._open_dir(_META, create=False) if meta_dir is None else meta_dir
        try:
            _unlink_quietly(fd, _metadata_name(key, inode))
        finally:
            if own:
                os.close(fd)

    def _open_root(self) -> int:
        """A descriptor of the root folder, which must still hold its ``.jobflow``
        marker: a root that is gone, unreadable or unmarked is an outage
        (:class:`StorageUnavailable`), never a folder without objects."""
        try:
            fd = os.open(self._root, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise StorageUnavailable(
                f"the object folder {self._root} is unavailable ({exc.strerror}): is its "
                "volume mounted and readable?") from exc
        try:
            marker = os.stat(STATE_DIR, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, PermissionError) as exc:
            os.close(fd)
            raise StorageUnavailable(
                f"the object folder {self._root} has no readable {STATE_DIR} folder "
                f"({exc.strerror}): is its volume mounted?") from exc
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISLNK(marker.st_mode):
            os.close(fd)
            raise _symlink_refused(self._root, STATE_DIR)
        return fd

    def _open_dir(self, parts: Iterable[str], *, create: bool) -> int:
        """A descriptor of ``root/parts...``, refusing symbolic links on the way."""
        fd = self._open_root()
        try:
            for part in parts:
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                entry = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(entry.st_mode):
                    raise _symlink_refused(self._root, part)
                if not stat.S_ISDIR(entry.st_mode):
                    if create:
                        raise InvalidInput(f"{part!r} in the object folder is a file, not a "
                                           "folder; the key conflicts with an existing object")
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", part)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)  # O_NOFOLLOW: no swapped-in link
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _key_of_url(self, url: str) -> str:
        parsed = urlsplit(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise InvalidInput(f"not a local file:// upload URL: {url[:120]!r}")
        path = Path(unquote(parsed.path))
        try:
            relative = path.relative_to(self._root)
        except ValueError:
            raise InvalidInput(f"upload URL {url[:120]!r} is outside {self._root}") from None
        key = "/".join(relative.parts)
        _key_parts(key)
        return key

    @contextmanager
    def _fs_errors(self, action: str, key: str) -> Iterator[None]:
        """OS errors become jobflow errors; the caller handles "not found" first."""
        try:
            yield
        except PermissionError as exc:
            raise StoragePermissionDenied(
                f"cannot {action} {key!r} in {self._root}: permission denied; fix the folder's "
                "owner or mode") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _symlink_refused(self._root, key) from exc
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidInput(
                    f"object key {key[:80]!r} is too long for this filesystem") from exc
            raise StorageUnavailable(f"cannot {action} {key!r} in {self._root}: {exc}") from exc


def deliver(upload: UploadRequest, data: bytes | BinaryIO) -> ObjectInfo:
    """Perform a ``file://`` upload from its ticket alone (``method``, ``url``, ``headers``).

    The folder is the nearest one above the target that holds a
    ``.jobflow`` state folder; see :meth:`LocalObjectStore.deliver`.
    """
    parsed = urlsplit(upload.url)
    if parsed.scheme != "file":
        raise InvalidInput(f"not a local file:// upload URL: {upload.url[:120]!r}")
    target = Path(unquote(parsed.path))
    for folder in target.parents:
        state = folder / STATE_DIR
        if state.is_dir() and not state.is_symlink():
            return LocalObjectStore(folder).deliver(upload, data)
    raise InvalidInput(f"{upload.url[:120]!r} is not inside a jobflow object folder")


def write_file_atomically(dest: Path, stream: BinaryIO) -> Path:
    """Copy ``stream`` to ``dest`` through a temporary file and a rename.

    ``dest`` then holds the whole stream or is left untouched.
    """
    temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        with temp.open("xb") as out:
            shutil.copyfileobj(stream, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, dest)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError
                      | PermissionError):
            raise InvalidInput(f"cannot write the download to {dest}: {exc}") from exc
        if isinstance(exc, OSError):
            raise StorageUnavailable(f"cannot write the download to {dest}: {exc}") from exc
        raise
    return dest


# -- small pieces ------------------------------------------------------------------------


def _key_parts(key: str) -> list[str]:
    parts = check_key(key).split("/")
    if STATE_DIR in parts:
        raise InvalidInput(f"object key {key[:80]!r} uses the reserved name {STATE_DIR!r}")
    return parts


def _chunks_of(data: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
        return
    while chunk := data.read(_CHUNK):
        yield chunk


def _entry(parent: int, name: str, key: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``parent``; None if absent; a symbolic link is refused."""
    try:
        entry = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(entry.st_mode):
        raise ConfigurationError(f"object {key!r} is a symbolic link; refusing to follow it")
    return entry


def _write_temp(tmp_dir: int, name: str, chunks: Iterable[bytes]
                ) -> tuple[int, str, str, os.stat_result]:
    """Stream ``chunks`` into a new file; its size, MD5, SHA-256 and final ``fstat``."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha256 = hashlib.sha256()
    size = 0
    fd = os.open(name, _CREATE_FLAGS, 0o644, dir_fd=tmp_dir)
    with os.fdopen(fd, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
        identity = os.fstat(out.fileno())
    return size, md5.hexdigest(), sha256.hexdigest(), identity


def _metadata_name(key: str, inode: int) -> str:
    return f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}-{inode}.json"


def _metadata_record(info: ObjectInfo, identity: os.stat_result) -> dict[str, Any]:
    return {
        "format": _METADATA_FORMAT, "key": info.key, "size": info.size,
        "content_type": info.content_type, "etag": info.etag, "version_id": info.version_id,
        "sha256": info.sha256, "inode": identity.st_ino, "mtime_ns": identity.st_mtime_ns,
    }


def _write_json(directory: int, name: str, record: dict[str, Any], tmp_dir: int) -> None:
    temp_name = f"{uuid.uuid4().hex}.json.part"
    fd = os.open(temp_name, _CREATE_FLAGS, 0o644, dir_fd=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps(record, sort_keys=True).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, name, src_dir_fd=tmp_dir, dst_dir_fd=directory)
    except BaseException:
        _unlink_quietly(tmp_dir, temp_name)
        raise
    os.fsync(directory)


def _unlink_quietly(directory: int, name: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)


def _symlink_refused(root: Path, where: str) -> ConfigurationError:
    return ConfigurationError(
        f"{where!r} in the object folder {root} is or passes through a symbolic link; "
        "jobflow never follows links out of its folder")
