"""The one storage layer: every artifact path and every input URL goes through here, local or remote.

A path is a local path or a URL: `s3://bucket/prefix` (s3fs), `gs://bucket/prefix` (gcsfs), anything else fsspec
knows. Endpoints and credentials come from each library's standard environment: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` for S3; `STORAGE_EMULATOR_HOST` or
application default credentials for GCS. TensorFlow's `tf.io.gfile` has no S3 in TF 2.21, so nothing here uses
it: what TensorFlow or Keras must read or write (TFRecords, checkpoints, `.keras` files) is staged through a
local directory (`artifacts.local_cache`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import uuid
from typing import IO, Any

import fsspec

from tasks.errors import PipelineError, first_line

CREDENTIAL_HINTS = {
    "s3": "AWS_ENDPOINT_URL (for S3-compatible stores), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "gs": "STORAGE_EMULATOR_HOST (for an emulator) or GOOGLE_APPLICATION_CREDENTIALS",
}


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def prune_empty(*directories: str) -> None:
    """Remove each local directory if it is empty (children first)."""
    for d in directories:
        if is_local(d):
            try:
                os.rmdir(d)
            except OSError:
                pass


def join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:] if p.strip("/")])


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `path`, and the path as that filesystem names it.

    A bucket's listings are not cached: s3fs and gcsfs keep the listings they made (a `find` stores every
    directory it saw) and answer later `ls`, `info` and `open` from them, so in a long-lived process (`tfpipe
    serve`, a run waiting on a lease) a manifest or a checkpoint written since by another process would look
    missing."""
    if is_local(path):
        return fsspec.core.url_to_fs(path)
    if path.split("://", 1)[0] == "gs":
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # else gcsfs probes over gRPC first
    return fsspec.core.url_to_fs(path, use_listings_cache=False)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def open_file(path: str, mode: str = "rb") -> IO:
    fs, p = filesystem(path)
    if "w" in mode and is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    return fs.open(p, mode)


def read_json(path: str) -> Any:
    with open_file(path, "r") as f:
        return json.load(f)


def write_json(path: str, value: Any, create_only: bool = False) -> None:
    """Write JSON whole (see write_bytes)."""
    write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode(), create_only)


def write_bytes(path: str, data: bytes, create_only: bool = False) -> None:
    """Write a file so that readers see the old file or the new one, whole: a local file is written beside and
    renamed over; an object is one PUT. `create_only` refuses to replace an existing file (FileExistsError): the
    conditional create that makes a manifest the commit of a publication."""
    fs, p = filesystem(path)
    if is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        if create_only:
            try:
                os.link(tmp, p)  # fails when `p` exists: an atomic create-if-absent
            finally:
                os.remove(tmp)
        else:
            os.replace(tmp, p)
        return
    fs.pipe_file(p, data, mode="create" if create_only else "overwrite")


def exchange(a: str, b: str) -> bool:
    """Swap two local paths in one step (Linux renameat2 with RENAME_EXCHANGE), so that a reader of either sees
    the old or the new entry, never none. False where the system or the filesystem cannot swap."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), a)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_identity(path: str) -> str:
    """A cheap identity of a file's content: its size with the store's checksum (an S3 ETag, a GCS md5 or
    crc32c) or, locally, its modification time."""
    fs, p = filesystem(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist: check the path") from None
    return sha256_text(_identity(info))


def _identity(info: dict) -> str:
    stamp = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c") or info.get("mtime")
    return f"{info.get('size')}:{stamp}"


def _listing(path: str) -> dict[str, dict]:
    """Every file under `path`, by path relative to it, with fsspec's details, from one listing: the one way a
    folder's files get their relative paths (a relative folder, an absolute one and a bucket prefix alike)."""
    fs, p = filesystem(path)
    try:
        found = fs.find(p, detail=True)
    except FileNotFoundError:
        return {}
    base = p.rstrip("/") + "/"
    return {name[len(base):]: info for name, info in found.items() if name.startswith(base)}


def relative_to(path: str, base: str) -> str:
    """`path` relative to the directory `base`, whatever form each is given in (relative or absolute, a URL)."""
    inside = filesystem(base)[1].rstrip("/") + "/"
    full = filesystem(path)[1]
    return full[len(inside):] if full.startswith(inside) else full


def glob_under(pattern: str) -> tuple[str, list[str]]:
    """(base, the files a glob pattern matches, by path relative to base, sorted): base is the pattern's folder
    before its first wildcard."""
    first = min(pattern.index(c) for c in "*?[" if c in pattern)
    base = pattern[:first].rsplit("/", 1)[0] if "/" in pattern[:first] else "."
    base = os.path.abspath(base.removeprefix("file://")) if is_local(base) else base  # the same from any directory
    fs, p = filesystem(pattern)
    inside = filesystem(base)[1].rstrip("/") + "/"
    return base, sorted(match[len(inside):] for match, info in fs.glob(p, detail=True).items()
                        if match.startswith(inside) and info.get("type") == "file")


def identities_under(path: str) -> dict[str, str]:
    """Every file under `path`, by path relative to it, with its cheap identity (size and checksum or mtime),
    from one listing: what hashing a folder of thousands of files costs one request for."""
    return {name: _identity(info) for name, info in _listing(path).items()}


def _as_given(path: str, names: list[str]) -> list[str]:
    """Paths an fsspec filesystem returned, in the form `path` was given (a URL keeps its scheme), sorted."""
    scheme = "" if is_local(path) else path.split("://", 1)[0] + "://"
    return sorted(f"{scheme}{name}" for name in names)


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def find(path: str) -> list[str]:
    """Every file under the directory or prefix `path`, as paths or URLs like `path`, sorted."""
    fs, p = filesystem(path)
    return _as_given(path, fs.find(p))


def listdir(path: str) -> list[str]:
    """The names directly under `path` (files and directories); empty when it does not exist."""
    fs, p = filesystem(path)
    try:
        return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
    except FileNotFoundError:
        return []


def files_under(path: str) -> dict[str, int]:
    """Every file under `path`, by path relative to it, with its size."""
    return {name: info.get("size", 0) for name, info in _listing(path).items()}


def remove(path: str) -> None:
    """Remove a file or a whole tree; nothing when it does not exist."""
    fs, p = filesystem(path)
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass


def upload(local_dir: str, path: str) -> None:
    """Copy a local directory's files under `path` (a local directory or a prefix)."""
    fs, p = filesystem(path)
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            fs.put_file(os.path.join(root, name), join(p, rel.replace(os.sep, "/")))


def upload_file(local_path: str, path: str) -> None:
    fs, p = filesystem(path)
    if is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    fs.put_file(local_path, p)


def download(path: str, local_path: str) -> None:
    fs, p = filesystem(path)
    os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    tmp = f"{local_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fs.get_file(p, tmp)
    os.replace(tmp, local_path)


def check_reachable(root: str) -> None:
    """One clear line when a remote artifact root cannot be used: no such bucket, no credentials, no endpoint."""
    if is_local(root):
        return
    scheme = root.split("://", 1)[0]
    hint = CREDENTIAL_HINTS.get(scheme, "the credentials its fsspec filesystem reads")
    try:
        fs, p = filesystem(root)
        bucket = p.split("/", 1)[0]
        fs.ls(bucket, detail=False)
    except ImportError as exc:
        raise PipelineError(f"{root}: no filesystem for {scheme}:// ({first_line(exc)}): pip install s3fs or gcsfs") from None
    except FileNotFoundError:
        raise PipelineError(f"artifacts.root {root}: the bucket does not exist: create it, or fix the URL") from None
    except Exception as exc:  # credentials, endpoint, permissions: each library raises its own types
        raise PipelineError(f"artifacts.root {root} cannot be reached ({type(exc).__name__}: {first_line(exc, 160)}): "
                            f"check the bucket and set {hint}") from None
