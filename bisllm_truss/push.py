"""`bisllm push`: hand a packaged truss directory to the real `truss push`."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

# What truss itself reads (truss/remote/remote_factory.py).
TRUSSRC_ENV = "USER_TRUSSRC_PATH"
API_KEY_ENV = "BASETEN_TRUSS_AUTH_API_KEY"
REMOTE_URL_ENV = "BASETEN_TRUSS_AUTH_REMOTE_URL"


class PushError(Exception):
    """Something a user must fix before pushing (no truss, no credentials, push failed)."""


def find_truss() -> str:
    path = shutil.which("truss")
    if path is None:
        raise PushError(
            "truss is not installed (no `truss` on PATH); install it with "
            "`pip install 'bisllm-truss[truss]'` and run `truss login` once"
        )
    return path


def has_credentials() -> bool:
    """True when truss would find a Baseten remote: environment variables or a ~/.trussrc entry."""
    if os.environ.get(API_KEY_ENV) and os.environ.get(REMOTE_URL_ENV):
        return True
    trussrc = Path(os.environ.get(TRUSSRC_ENV, "~/.trussrc")).expanduser()
    if not trussrc.is_file():
        return False
    parser = configparser.ConfigParser()
    try:
        parser.read(trussrc)
    except configparser.Error:
        return False
    return any(parser.has_option(section, "api_key") for section in parser.sections())


def push(truss_dir: Path, extra_args: Sequence[str] = ()) -> int:
    """Run `truss push` on `truss_dir`; return its exit code."""
    truss = find_truss()
    if not has_credentials():
        raise PushError(
            "no Baseten credentials configured: run `truss login` (writes ~/.trussrc) or set "
            f"{API_KEY_ENV} and {REMOTE_URL_ENV}"
        )
    command = [truss, "push", str(truss_dir), *extra_args]
    return subprocess.run(command, check=False).returncode
