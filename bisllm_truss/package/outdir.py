"""Write a rendered file tree into the output directory without ever touching anything else.

Everything is rendered in memory first; only then is the tree written into a fresh sibling
directory and moved into place, so a failure leaves nothing half-written and `--force` only ever
replaces a directory that `bisllm package` itself produced (it carries a marker file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

MARKER = ".bisllm-package"


class OutputDirError(Exception):
    """The output directory cannot be used; nothing was written."""


def _check_relative(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise OutputDirError(
            f"refusing to write '{name}': it would land outside the output directory"
        )


def check_target(out_dir: Path, *, force: bool, protected: list[Path]) -> Path:
    """Resolve and vet `out_dir`; raise OutputDirError explaining why it cannot be used."""
    target = out_dir.expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"-o {out_dir}: is a file, expected a directory")
    home = Path.home().resolve()
    if target == Path(target.anchor) or target in (home, Path.cwd().resolve()):
        raise OutputDirError(
            f"-o {out_dir}: refusing to package into {target}; choose a dedicated directory"
        )
    for path in protected:
        path = path.resolve()
        if path == target or target in path.parents:
            raise OutputDirError(
                f"-o {out_dir}: the output directory would contain or replace {path}; "
                "choose a directory that does not hold your config"
            )
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise OutputDirError(
                f"-o {out_dir}: directory is not empty (use --force to replace it)"
            )
        if not (target / MARKER).is_file():
            raise OutputDirError(
                f"-o {out_dir}: refusing to replace a directory that bisllm package did not "
                f"create (no {MARKER} marker in it)"
            )
    if not target.parent.is_dir():
        raise OutputDirError(f"-o {out_dir}: parent directory {target.parent} does not exist")
    return target


def write_tree(
    files: dict[str, bytes],
    out_dir: Path,
    *,
    force: bool = False,
    protected: list[Path] | None = None,
) -> Path:
    """Write `files` (relative POSIX path → bytes) as the whole content of `out_dir`."""
    for name in files:
        _check_relative(name)
    target = check_target(out_dir, force=force, protected=protected or [])
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, content in sorted(files.items()):
            path = staging.joinpath(*PurePosixPath(name).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            if name.endswith(".sh"):
                path.chmod(0o755)
        os.chmod(staging, 0o755)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(retired / "tree")
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
