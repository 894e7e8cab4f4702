"""`weights`: BDN-style weight sources mirrored ahead of time and mounted read-only in the container."""

from __future__ import annotations

import enum
import posixpath
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from bisllm_truss.issues import check_all
from bisllm_truss.schema.base import StrictModel

OBJECT_STORE_SCHEMES = ("s3", "gs", "r2", "azure", "cw")
SUPPORTED_SCHEMES = ("hf", *OBJECT_STORE_SCHEMES, "https", "file")


class AuthMethod(str, enum.Enum):
    CUSTOM_SECRET = "CUSTOM_SECRET"
    AWS_OIDC = "AWS_OIDC"
    GCP_OIDC = "GCP_OIDC"
    AWS_ASSUME_ROLE = "AWS_ASSUME_ROLE"


# Which auth fields each method needs; every other credential field must then be empty.
_AUTH_FIELDS = {
    AuthMethod.CUSTOM_SECRET: ("auth_secret_name",),
    AuthMethod.AWS_OIDC: ("aws_oidc_role_arn", "aws_oidc_region"),
    AuthMethod.GCP_OIDC: ("gcp_oidc_service_account", "gcp_oidc_workload_id_provider"),
    AuthMethod.AWS_ASSUME_ROLE: ("aws_assume_role_arn", "aws_assume_role_region"),
}


class WeightsAuth(StrictModel):
    auth_method: AuthMethod
    auth_secret_name: str | None = None
    aws_oidc_role_arn: str | None = None
    aws_oidc_region: str | None = None
    gcp_oidc_service_account: str | None = None
    gcp_oidc_workload_id_provider: str | None = None
    aws_assume_role_arn: str | None = None
    aws_assume_role_region: str | None = None

    @field_validator("auth_method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fields_match_method(self) -> WeightsAuth:
        needed = _AUTH_FIELDS[self.auth_method]
        others = {f for fields in _AUTH_FIELDS.values() for f in fields} - set(needed)
        method = self.auth_method.value
        check_all(
            *(
                (not getattr(self, f), (f,), f"{f} must be provided when auth_method is {method}")
                for f in needed
            ),
            *(
                (
                    bool(getattr(self, f)),
                    (f,),
                    f"{f} cannot be specified when auth_method is {method}",
                )
                for f in sorted(others)
            ),
        )
        return self


class WeightsSource(StrictModel):
    source: Annotated[str, Field(min_length=1)]
    mount_location: Annotated[str, Field(min_length=1)]
    auth: WeightsAuth | None = None
    auth_secret_name: str | None = None
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None

    @field_validator("source")
    @classmethod
    def _source_uri(cls, value: str) -> str:
        expected = "expected one of " + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError(f"source '{value}' has no URI scheme; {expected}")
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"unsupported source scheme '{scheme}://'; {expected}")
        if scheme == "file":
            if not rest.startswith("/"):
                raise ValueError(
                    f"file:// sources need an absolute path (file:///data/x), got '{value}'"
                )
            return value
        if not rest or rest.startswith("/"):
            raise ValueError(
                f"source '{value}' is missing its {scheme} location after '{scheme}://'"
            )
        if "@" in rest and scheme != "hf":
            raise ValueError(f"the @revision suffix is only valid for hf:// sources, got '{value}'")
        if scheme == "hf":
            repo, _, revision = rest.partition("@")
            if repo.count("/") != 1 or ("@" in rest and not revision):
                raise ValueError(f"expected hf://owner/repo[@revision], got '{value}'")
        return value

    @field_validator("mount_location")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if (
            not value.startswith("/")
            or posixpath.normpath(value) == "/"
            or ".." in value.split("/")
        ):
            raise ValueError(
                f"mount_location must be an absolute path below / without '..', got '{value}'"
            )
        return value

    @model_validator(mode="after")
    def _credentials(self) -> WeightsSource:
        scheme = self.scheme
        has_secret = bool(self.auth_secret_name or (self.auth and self.auth.auth_secret_name))
        check_all(
            (
                bool(self.auth_secret_name and self.auth and self.auth.auth_secret_name),
                ("auth_secret_name",),
                "auth_secret_name cannot be set both here and in auth; use one place",
            ),
            # BDN reads object stores only with credentials (its documented errors).
            (
                scheme in ("s3", "r2") and self.auth is None and not has_secret,
                ("auth",),
                "secret_id is required: s3:// and r2:// sources need auth_secret_name "
                "(a secret with aws_access_key_id / aws_secret_access_key) or auth OIDC settings",
            ),
            (
                scheme == "gs" and self.auth is None and not has_secret,
                ("auth",),
                "no credentials configured: need either OIDC config or secret_id "
                "(auth_secret_name of a GCP service-account JSON secret)",
            ),
        )
        return self

    @property
    def scheme(self) -> str:
        return self.source.partition("://")[0]

    @property
    def secret_name(self) -> str | None:
        return self.auth_secret_name or (self.auth.auth_secret_name if self.auth else None)
