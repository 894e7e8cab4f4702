"""Credentials for weights sources: secrets read from files, parsed in the documented formats.

Truss (and Baseten) mount each secret as a file, ``/secrets/<name>``, whose content is the value.
`SecretStore` reads them from ``$BISLLM_SECRETS_DIR`` (default ``/secrets``).

Formats, per source scheme (product spec §6; key names are exact):

* ``hf://`` -- the plain access token. Public repos need no secret.
* ``s3://`` -- JSON ``{"aws_access_key_id", "aws_secret_access_key", "aws_region"
  (default us-east-1), "aws_session_token" (optional)}``.
* ``r2://`` -- JSON ``{"aws_access_key_id", "aws_secret_access_key"}`` (R2's S3 API keys;
  the region is ``auto``).
* ``gs://`` -- HMAC interoperability keys in the S3 JSON format. This mirror reads GCS through
  its S3-compatible XML API, which signs with HMAC keys. A service-account JSON key (what the
  BDN docs describe) is recognized and refused with a "not supported yet" error that says how
  to create HMAC keys: using it would need OAuth token minting, which this package does not do.
* ``https://`` -- optional; a plain token sent as ``Authorization: Bearer`` (a bisllm extension
  for private artifact servers; pre-signed URLs need no secret).

Nothing here ever puts a secret value into an exception message or a repr: errors name the
secret and the expected format, and credential objects print redacted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bisllm_bdn.uris import FileURI, HfURI, HttpURI, ObjectStoreURI, SourceURI

SECRETS_DIR_ENV = "BISLLM_SECRETS_DIR"
DEFAULT_SECRETS_DIR = Path("/secrets")
DEFAULT_S3_REGION = "us-east-1"
# R2 and GCS accept SigV4 signed for the pseudo-region "auto".
AUTO_REGION = "auto"

S3_KEYS_REQUIRED = "aws_access_key_id and aws_secret_access_key are required in S3 credentials"
SECRET_ID_REQUIRED = "secret_id is required"
NO_GCS_CREDENTIALS = "no credentials configured: need either OIDC config or secret_id"
CUSTOM_SECRET = "CUSTOM_SECRET"

_S3_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_region", "aws_session_token")
_S3_FORMAT = (
    '{"aws_access_key_id": "...", "aws_secret_access_key": "...", '
    '"aws_region": "us-east-1" (optional), "aws_session_token": "..." (optional)}'
)
_HMAC_FORMAT = '{"aws_access_key_id": "GOOG...", "aws_secret_access_key": "..."}'
# Secret names become file names: one path component, no traversal.
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
# Only names that look like field names are echoed back in "unknown key" errors; anything else
# might be a credential pasted into the wrong place.
_FIELD_NAME = re.compile(r"^[a-z_]{1,40}$")


class CredentialsError(ValueError):
    """A secret is missing, unreadable or in the wrong format (never contains the value)."""


class SecretNotFoundError(CredentialsError):
    """No file for the named secret."""


class SecretStore:
    """Secrets as files in one directory: ``<directory>/<name>`` holds the value."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @classmethod
    def from_env(cls) -> SecretStore:
        """The store at ``$BISLLM_SECRETS_DIR``, or ``/secrets`` where Truss mounts secrets."""
        return cls(Path(os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR))

    def get(self, name: str) -> str:
        """The value of secret `name`, surrounding whitespace (a trailing newline) stripped."""
        if not _SECRET_NAME.match(name):
            raise CredentialsError(
                f"invalid secret name {name!r}: expected letters, digits, '.', '_' or '-' "
                "(a single file name)"
            )
        path = self.directory / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SecretNotFoundError(
                f"secret '{name}' not found: expected a file at {path} (Truss mounts secrets at "
                f"/secrets/<name>; set {SECRETS_DIR_ENV} to read them from another directory)"
            ) from None
        except OSError as exc:
            raise CredentialsError(
                f"secret '{name}' at {path} cannot be read: {exc.strerror}"
            ) from None
        value = _decode(raw)
        if value is None:
            raise CredentialsError(f"secret '{name}' at {path} is not UTF-8 text")
        if not value:
            raise CredentialsError(f"secret '{name}' at {path} is empty")
        return value

    def __repr__(self) -> str:
        return f"SecretStore({str(self.directory)!r})"


@dataclass(frozen=True, repr=False)
class BearerToken:
    """A plain token (Hugging Face access token, or an https bearer token)."""

    token: str
    secret_name: str

    def __repr__(self) -> str:
        return f"BearerToken(secret_name={self.secret_name!r}, token=<redacted>)"


@dataclass(frozen=True, repr=False)
class S3Credentials:
    """Keys for an S3-compatible API (AWS S3, Cloudflare R2, GCS HMAC interoperability)."""

    access_key_id: str
    secret_access_key: str
    region: str
    secret_name: str
    session_token: str | None = None

    def __repr__(self) -> str:
        token = ", session_token=<redacted>" if self.session_token else ""
        return (
            f"S3Credentials(secret_name={self.secret_name!r}, region={self.region!r}, "
            f"access_key_id=<redacted>, secret_access_key=<redacted>{token})"
        )


Credentials = BearerToken | S3Credentials


def parse_token(value: str, *, secret_name: str) -> BearerToken:
    """A plain, single-line token (the HF `hf_access_token` format)."""
    token = value.strip()
    if not token:
        raise CredentialsError(f"secret '{secret_name}' is empty; expected a plain token")
    if token.startswith("{"):
        raise CredentialsError(
            f"secret '{secret_name}' looks like JSON; expected the plain token, nothing else"
        )
    if any(c.isspace() for c in token):
        raise CredentialsError(
            f"secret '{secret_name}' contains whitespace; expected one plain token on one line"
        )
    return BearerToken(token=token, secret_name=secret_name)


def parse_s3_credentials(
    value: str, *, secret_name: str, default_region: str = DEFAULT_S3_REGION
) -> S3Credentials:
    """The S3 JSON format (also R2's and GCS HMAC keys'); `aws_region` defaults as given."""
    data = _json_object(value, secret_name, _S3_FORMAT)
    unknown = sorted(set(data) - set(_S3_KEYS))
    if unknown:
        shown = [k for k in unknown if _FIELD_NAME.match(k)]
        hidden = len(unknown) - len(shown)
        listed = ", ".join(shown) + (f"{', ' if shown else ''}{hidden} other(s)" if hidden else "")
        raise CredentialsError(
            f"secret '{secret_name}' has unknown keys ({listed}); "
            f"key names are exact, expected {_S3_FORMAT}"
        )
    for key, item in data.items():
        if not isinstance(item, str):
            raise CredentialsError(
                f"secret '{secret_name}': {key} must be a string, got {type(item).__name__}"
            )
    if not data.get("aws_access_key_id") or not data.get("aws_secret_access_key"):
        raise CredentialsError(f"{S3_KEYS_REQUIRED} (secret '{secret_name}')")
    return S3Credentials(
        access_key_id=data["aws_access_key_id"],
        secret_access_key=data["aws_secret_access_key"],
        region=data.get("aws_region") or default_region,
        session_token=data.get("aws_session_token") or None,
        secret_name=secret_name,
    )


def parse_r2_credentials(value: str, *, secret_name: str) -> S3Credentials:
    """R2 API keys, in the S3 JSON format; R2 signs for the region ``auto``."""
    return parse_s3_credentials(value, secret_name=secret_name, default_region=AUTO_REGION)


def parse_gcs_credentials(value: str, *, secret_name: str) -> S3Credentials:
    """GCS HMAC interoperability keys in the S3 JSON format; service-account keys are refused."""
    data = _json_object(value, secret_name, _HMAC_FORMAT)
    if data.get("type") == "service_account" or "private_key" in data or "client_email" in data:
        raise CredentialsError(
            f"secret '{secret_name}' holds a GCP service-account key, which is not supported "
            "yet: use HMAC interoperability keys. The mirror reads gs:// through the "
            "S3-compatible XML API, which signs with HMAC keys; create them with "
            "`gcloud storage hmac create SERVICE_ACCOUNT_EMAIL` and store them as "
            f"{_HMAC_FORMAT}"
        )
    return parse_s3_credentials(value, secret_name=secret_name, default_region=AUTO_REGION)


def resolve_credentials(
    source: SourceURI,
    *,
    auth: Mapping[str, Any] | None = None,
    secret_name: str | None = None,
    secrets: SecretStore | None = None,
) -> Credentials | None:
    """The credentials `source` is read with, or None where it needs none.

    `auth` is a `weights[].auth` mapping (auth_method, auth_secret_name, ...) and `secret_name`
    the resolved secret of a deployment spec's WeightsMount; they must agree when both are set.
    """
    name = _secret_name(auth, secret_name)
    if name is None:
        if isinstance(source, ObjectStoreURI) and source.scheme in ("s3", "r2"):
            raise CredentialsError(
                f"{SECRET_ID_REQUIRED}: {source.scheme}:// sources need auth_secret_name "
                "(a secret with aws_access_key_id / aws_secret_access_key)"
            )
        if isinstance(source, ObjectStoreURI):
            raise CredentialsError(
                f"{NO_GCS_CREDENTIALS} (auth_secret_name of a secret with GCS HMAC keys, "
                f"{_HMAC_FORMAT})"
            )
        return None
    if isinstance(source, FileURI):
        raise CredentialsError(
            f"file:// sources are read without credentials; remove secret '{name}' from this entry"
        )
    value = (secrets or SecretStore.from_env()).get(name)
    if isinstance(source, HfURI | HttpURI):
        return parse_token(value, secret_name=name)
    if source.scheme == "gs":
        return parse_gcs_credentials(value, secret_name=name)
    if source.scheme == "r2":
        return parse_r2_credentials(value, secret_name=name)
    return parse_s3_credentials(value, secret_name=name)


def _secret_name(auth: Mapping[str, Any] | None, secret_name: str | None) -> str | None:
    """The one secret named by `auth` and/or `secret_name`; other auth methods are refused."""
    if not auth:
        return secret_name
    method = str(auth.get("auth_method") or CUSTOM_SECRET).upper()
    if method != CUSTOM_SECRET:
        raise CredentialsError(
            f"auth_method {method} is not supported by the bisllm mirror: it needs the "
            "platform's workload identity, which a self-hosted mirror does not have; use "
            f"auth_method {CUSTOM_SECRET} with auth_secret_name"
        )
    from_auth = auth.get("auth_secret_name")
    if from_auth and secret_name and from_auth != secret_name:
        raise CredentialsError(
            f"two secrets named for one source: auth.auth_secret_name '{from_auth}' and "
            f"secret_name '{secret_name}'"
        )
    return secret_name or from_auth


def _decode(raw: bytes) -> str | None:
    """`raw` as stripped UTF-8 text, or None.

    The errors raised while parsing a secret carry the secret itself (UnicodeDecodeError.object,
    JSONDecodeError.doc), so they are never allowed to become the context of ours: the callers
    raise after the `except` block has ended.
    """
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _json_object(value: str, secret_name: str, expected: str) -> dict[str, Any]:
    where = None
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if where is not None:  # raised here, not in the handler: see _decode
        raise CredentialsError(
            f"secret '{secret_name}' is not valid JSON ({where}); expected {expected}"
        )
    if not isinstance(data, dict):
        raise CredentialsError(
            f"secret '{secret_name}' is JSON {type(data).__name__}, not an object; "
            f"expected {expected}"
        )
    return data
