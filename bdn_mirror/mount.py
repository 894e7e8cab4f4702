"""Placing cached blobs at their paths in a mount: one hardlink per file (a copy when the
cache is on another filesystem, or when the mount must be writable), created under a temporary
name and renamed into place so the server never sees a half-made file; symlinks that would lead
outside the mount are refused."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import uuid
from pathlib import Path

from bisllm_bdn.errors import HydrateError, UnsafePathError

log = logging.getLogger(__name__)

# Extended attribute recorded on copied (not hardlinked) files so a rerun can recognise them.
_COPY_XATTR = "user.bisllm_bdn"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def target_path(root: Path, rel: str, *, create: bool) -> Path:
    """The real location of ``root/rel``, refusing symlinks that lead outside `root`.

    Walks the parents one at a time so that no directory is created through an escaping symlink;
    symlinks that stay inside `root` are followed. `root` must already be resolved.
    """
    parts = rel.split("/")
    current = root
    for part in parts[:-1]:
        current = current / part
        if current.is_symlink():
            resolved = current.resolve()
            if not _inside(resolved, root):
                raise UnsafePathError(
                    f"{rel}: {current} is a symlink to {resolved}, outside the target {root}"
                )
            current = resolved
        if current.exists():
            if not current.is_dir():
                raise HydrateError(f"{rel}: {current} exists and is not a directory")
        elif create:
            current.mkdir(exist_ok=True)
    leaf = current / parts[-1]
    if leaf.is_symlink() and not _inside(leaf.resolve(), root):
        raise UnsafePathError(
            f"{rel}: {leaf} is a symlink to {leaf.resolve()}, outside the target {root}"
        )
    return leaf


def _copy_record(sha256: str, st: os.stat_result) -> bytes:
    return f"sha256={sha256} size={st.st_size} mtime_ns={st.st_mtime_ns}".encode("ascii")


def is_current(dest: Path, blob: Path, sha256: str, *, read_only: bool) -> bool:
    """Whether `dest` already holds this blob: the same inode, or a recorded unchanged copy."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    blob_st = blob.stat()
    if (st.st_dev, st.st_ino) == (blob_st.st_dev, blob_st.st_ino):
        return read_only  # a writable request must not keep a link into the cache
    if stat.S_IMODE(st.st_mode) != _copy_mode(read_only):
        return False
    try:
        return os.getxattr(dest, _COPY_XATTR, follow_symlinks=False) == _copy_record(sha256, st)
    except OSError:
        return False


def _copy_mode(read_only: bool) -> int:
    return 0o444 if read_only else 0o644


def place(dest: Path, blob: Path, sha256: str, *, read_only: bool) -> None:
    """Atomically put the blob's content at `dest`: a hardlink, or a copy when that cannot be."""
    if dest.is_dir() and not dest.is_symlink():
        raise HydrateError(f"{dest} is a directory; the manifest lists a file there")
    tmp = dest.with_name(f".{dest.name}.bdn-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        copy = not read_only
        if read_only:
            try:
                os.link(blob, tmp)
            except OSError as exc:
                if exc.errno not in {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}:
                    raise
                log.warning("cannot hardlink %s into %s (%s); copying instead", blob, dest, exc)
                copy = True
        if copy:
            # A writable file must be a private copy: writing through a hardlink would change
            # the cached blob under every other mount.
            shutil.copyfile(blob, tmp)
            os.chmod(tmp, _copy_mode(read_only))
            with contextlib.suppress(OSError):  # xattrs are an optimisation for reruns
                os.setxattr(tmp, _COPY_XATTR, _copy_record(sha256, os.stat(tmp)))
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
