"""Where experiments live: a local folder or a URI (``s3://``, ``gs://``, ``file://``, with pyarrow's options as a query
such as ``?endpoint_override=...``), read and written through pyarrow's filesystems as Ray Tune does. A full disk is
recognized here too. Torch- and Ray-free.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import AstCvError
from .lock import check_held

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a path or a URI, keeping a URI's query (its filesystem options) at the end."""
    base, sep, query = str(location).partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return joined + (sep + query if sep else "")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _nearest_existing(path: str | Path) -> Path:
    """``path``, or its nearest folder that exists (a storage path or cache may not be made yet)."""
    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing folder), None if unknown."""
    try:
        return shutil.disk_usage(_nearest_existing(path)).free
    except OSError:
        return None


TEMP_PREFIX = "astcv-"


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named after this process (``astcv-<kind>-p<pid>-...``), so that one left by a killed
    process can be recognized and removed by ``sweep_temp``."""
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{kind}-p{os.getpid()}-")


def sweep_temp() -> int:
    """Remove temporary folders of ours whose process is gone (a worker killed while it held a checkpoint: up to
    1 GB each for AST-base). Returns how many were removed."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-p*-*"):
        try:
            pid = int(path.name.split("-p", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def same_filesystem(a: str | Path, b: str | Path) -> bool:
    try:
        return _nearest_existing(a).stat().st_dev == _nearest_existing(b).stat().st_dev
    except OSError:
        return False


def exception_chain(exc: BaseException | None, limit: int = 10) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during (Ray and pyarrow wrap the cause), at most ``limit`` of them."""
    for _ in range(limit):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: Ray and pyarrow re-raise with the cause in the text) is a full disk."""
    return any(isinstance(e, StorageFull) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
               or any(t in str(e) for t in DISK_FULL_TEXT) for e in exception_chain(exc))


class StorageFull(AstCvError):
    """A write failed because the disk (or quota) is full; the message names the path, what is free, what to do."""

    MARKER = "StorageFull: "  # how a traceback (Ray's error.txt) shows it: ``trainable.store.storage.StorageFull: message``

    def __init__(self, path: str | Path, detail: str = "", elsewhere: str = "--storage-path on a larger disk"):
        self.path = str(path)
        free = free_bytes(path) if not is_uri(path) else None
        where = f"{self.path} is full" + (f" ({human_bytes(free)} free)" if free is not None else "")
        super().__init__(f"{where}{': ' + detail if detail else ''}. Free space there (or use {elsewhere}), then run "
                         f"the same command again: finished trials are kept.")

    def __reduce__(self):  # picklable across Ray's process boundary with its message intact
        return (_storage_full, (self.path, str(self)))

    @classmethod
    def from_error_text(cls, text: str, path: str) -> "StorageFull | None":
        """The StorageFull a trial's error text (Ray's error.txt) reports, or None if it reports none. A full disk
        that our code did not word (Ray's own upload failed) names ``path``."""
        for line in text.splitlines():
            if cls.MARKER in line:
                return _storage_full(path, line.split(cls.MARKER, 1)[-1].strip())
        return cls(path) if any(t in text for t in DISK_FULL_TEXT) else None


def _storage_full(path: str, message: str) -> "StorageFull":
    exc = StorageFull.__new__(StorageFull)
    AstCvError.__init__(exc, message)
    exc.path = path
    return exc


# Object storage errors as pyarrow (the AWS SDK for s3://, google-cloud-cpp for gs://) words them: (words, what is
# wrong, how to fix it). Each becomes one line instead of a traceback, in a run and in --report-only.
REMOTE_PROBLEMS = (
    (("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist", "To create buckets"), "the bucket does not exist",
     "create it (e.g. aws s3 mb s3://BUCKET, gcloud storage buckets create gs://BUCKET) or fix the bucket's name"),
    (("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId", "PERMISSION_DENIED",
      "UNAUTHENTICATED", "EXPIRED_TOKEN"), "access denied",
     "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS "
     "for gs://) and that they may read and write the bucket"),
    (("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve", "UNAVAILABLE"),
     "the endpoint cannot be reached",
     "check the endpoint (AWS_ENDPOINT_URL, or ?endpoint_override=HOST:PORT in the URI), the region and the network"),
)


def remote_storage_error(exc: BaseException) -> AstCvError | None:
    """One line for an object-storage failure (missing bucket, wrong credentials, unreachable endpoint) anywhere in
    ``exc``'s chain, or None when it is none of those."""
    for e in exception_chain(exc):
        text = " ".join(str(e).split())
        for words, what, fix in REMOTE_PROBLEMS:
            if any(w in text for w in words):
                return AstCvError(f"Storage: {what} ({text[:200].rstrip('. ')}). To fix: {fix}.")
    return None


@dataclass(frozen=True)
class Store:
    """An experiment folder (or any folder) on a local disk or behind a URI; paths below it are relative, '/'-joined."""

    location: str  # as the user gave it (absolute for local paths); a URI keeps its query
    fs: Any  # pyarrow.fs.FileSystem
    root: str  # the folder's path inside ``fs``

    @classmethod
    def of(cls, exp: "Store | str | Path") -> "Store":
        """``exp`` itself if it is a Store, else the Store at that location."""
        return exp if isinstance(exp, Store) else cls.open(exp)

    @classmethod
    def open(cls, location: str | Path) -> "Store":
        import pyarrow.fs as pafs

        location = str(location)
        if not is_uri(location):
            location = str(Path(location).expanduser().resolve())
            return cls(location, pafs.LocalFileSystem(), location)
        try:
            fs, root = pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise AstCvError(f"Cannot open storage {location!r}: {exc}. Pass a local folder or a URI such as "
                             f"s3://bucket/runs, gs://bucket/runs or file:///abs/path.") from exc
        return cls(location, fs, root.rstrip("/"))

    @property
    def local_path(self) -> Path | None:
        """The folder on this machine's disk when the filesystem is local (a plain path or file://), else None."""
        import pyarrow.fs as pafs

        return Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _info(self, rel: str):
        return self.fs.get_file_info(self.path(rel))

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        if not self.is_file(rel):
            return None
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write_text(self, rel: str, text: str) -> None:
        """Write a file whole: locally through a temporary file renamed over it (never half-written); on object
        storage in one request (objects appear whole)."""
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        check_held()  # a holder that lost the experiment's lock stops before writing
        local = self.local_path
        try:
            if local is not None:
                target = local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                return
            parent = self.path(rel).rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(self.path(rel)) as fh:
                fh.write(data)
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(self.location) from exc
            raise

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly under ``rel`` (sorted)."""
        import pyarrow.fs as pafs

        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list_files(self, rel: str = "") -> list[str]:
        """Names of the files directly under ``rel`` (sorted)."""
        import pyarrow.fs as pafs

        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def download(self, rel: str, dest: str | Path) -> Path:
        """Copy the file or folder ``rel`` to the local ``dest``."""
        import pyarrow.fs as pafs

        dest = Path(dest)
        (dest.parent if self.is_file(rel) else dest).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(dest), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return dest

    def put_dir(self, src: str | Path, rel: str) -> None:
        """Replace the folder ``rel`` with a copy of the local folder ``src``. Locally the copy is made beside it and
        renamed into place, so readers see the old folder or the new one, never half of one."""
        import pyarrow.fs as pafs

        check_held()
        local = self.local_path
        try:
            if local is not None:
                target = local / rel
                tmp = target.with_name(target.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    shutil.copytree(src, tmp)
                    shutil.rmtree(target, ignore_errors=True)
                    tmp.rename(target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                return
            self.delete(rel)
            self.fs.create_dir(self.path(rel), recursive=True)
            pafs.copy_files(str(src), self.path(rel), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(self.location) from exc
            raise

    def delete(self, rel: str) -> None:
        """Remove the folder or file ``rel`` if it is there."""
        check_held()
        info = self._info(rel)
        import pyarrow.fs as pafs

        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def check_bucket(self) -> None:
        """On object storage, refuse in one line when the bucket does not exist (reading would only find no files)."""
        import pyarrow.fs as pafs

        bucket = self.root.split("/", 1)[0]
        if self.local_path is None and bucket and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise AstCvError(f"Storage: the bucket does not exist ({bucket!r} of {self.location}). To fix: "
                             f"{REMOTE_PROBLEMS[0][2]}.")

    def check_writable(self) -> None:
        """Write, read back and remove a marker file: a storage that cannot be written fails now in one line, not
        at the manifest or a trial's first checkpoint."""
        marker = f".astcv-write-test-{uuid.uuid4().hex[:8]}"
        try:
            self.write_text(marker, "ok")
            ok = self.read_text(marker) == "ok"
            self.delete(marker)
        except OSError as exc:
            problem = remote_storage_error(exc)
            if problem is None:
                raise AstCvError(f"Cannot write to {self.location} ({exc}). Pass --storage-path with a folder or a "
                                 f"bucket you can write to.") from exc
            raise problem from exc
        if not ok:
            raise AstCvError(f"{self.location}: a file written there did not read back. Check the storage.")

    def free_bytes(self) -> int | None:
        local = self.local_path
        return free_bytes(local) if local is not None else None
