"""bisllm_bdn source URIs, patterns, credentials and readers, against loopback servers only."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import huggingface_hub.constants
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bisllm_bdn.auth import (
    NO_GCS_CREDENTIALS,
    S3_KEYS_REQUIRED,
    SECRET_ID_REQUIRED,
    BearerToken,
    CredentialsError,
    SecretNotFoundError,
    SecretStore,
    parse_gcs_credentials,
    parse_r2_credentials,
    parse_s3_credentials,
    parse_token,
    resolve_credentials,
)
from bisllm_bdn.patterns import PathFilter
from bisllm_bdn.sources import (
    Endpoints,
    RemoteFile,
    S3Source,
    Source,
    SourceAuthError,
    SourceError,
    open_source,
)
from bisllm_bdn.uris import FileURI, HfURI, HttpURI, ObjectStoreURI, SourceURIError, parse_source

if TYPE_CHECKING:
    from bdn_servers import FakeHub, MotoS3, RangeServer

# The loopback fixtures: moto_s3_server, range_server, fake_hub_server (imported by pytest
# itself, so their asserts are rewritten too).
pytest_plugins = ["bdn_servers"]

# Secret values the leak checks look for in every message and repr.
SECRET_KEY = "s3cr3t-DO-NOT-PRINT-0123456789abcdef"
HF_TOKEN = "hf_DoNotPrintThisToken0123456789"

FILES = {
    "config.json": b'{"model_type": "tiny"}',
    "model.safetensors": os.urandom(300_000),
    "tokenizer.json": b"{}" * 500,
    "original/consolidated.pth": os.urandom(70_000),
    "original/params/extra.json": b'{"a": 1}',
}


def read_all(source: Source) -> dict[str, bytes]:
    out = {}
    for file in source.list_files():
        with source.open(file.path) as handle:
            out[file.path] = handle.read()
        assert len(out[file.path]) == file.size
    return out


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def secrets_dir(tmp_path: Path, **values: str) -> SecretStore:
    directory = tmp_path / "secrets"
    directory.mkdir(exist_ok=True)
    for name, value in values.items():
        (directory / name).write_text(value + "\n")
    return SecretStore(directory)


def assert_no_leak(*things: object, secrets: tuple[str, ...] = (SECRET_KEY, HF_TOKEN)) -> None:
    for thing in things:
        texts = [str(thing), repr(thing)]
        # The whole exception chain: a logger or error tracker may print any of it.
        seen: list[BaseException] = [thing] if isinstance(thing, BaseException) else []
        while seen:
            exc = seen.pop()
            texts += [str(exc), repr(exc), repr(getattr(exc, "args", ()))]
            seen += [e for e in (exc.__cause__, exc.__context__) if e is not None]
        for text in texts:
            for secret in secrets:
                assert secret not in text, f"secret leaked into {text!r}"


# ---------------------------------------------------------------------------------------------
# URIs


def test_hf_uris() -> None:
    assert parse_source("hf://Qwen/Qwen3-8B") == HfURI(
        "hf://Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "main"
    )
    assert parse_source("hf://a/b@v1.0").revision == "v1.0"
    assert parse_source("hf://a/b@refs/pr/1").revision == "refs/pr/1"
    with pytest.raises(SourceURIError, match=r"there is no subpath.*allow_patterns"):
        parse_source("hf://a/b/sub")
    with pytest.raises(
        SourceURIError, match=r"expected hf://owner/repo\[@revision\], got 'hf://a'"
    ):
        parse_source("hf://a")
    with pytest.raises(SourceURIError, match="revision after '@' is empty"):
        parse_source("hf://a/b@")


def test_object_store_uris() -> None:
    s3 = parse_source("s3://bucket/models/llama")
    assert s3 == ObjectStoreURI("s3://bucket/models/llama", "s3", "bucket", "models/llama/")
    assert parse_source("s3://bucket").prefix == ""
    assert parse_source("s3://bucket/").prefix == ""
    assert parse_source("gs://my.bucket//a//b/").prefix == "a/b/"
    r2 = parse_source("r2://0123abcd.weights/q/x")
    assert (r2.account, r2.bucket, r2.prefix) == ("0123abcd", "weights", "q/x/")
    with pytest.raises(SourceURIError, match=r"expected r2://account_id\.bucket/prefix"):
        parse_source("r2://weights/q")
    with pytest.raises(SourceURIError, match="bucket is empty"):
        parse_source("s3:///x")
    with pytest.raises(SourceURIError, match=r"'\.\.' are not allowed"):
        parse_source("s3://b/a/../c")


def test_http_and_file_uris(tmp_path: Path) -> None:
    one = parse_source("https://example.com/a/model%20v1.gguf?sig=1#frag")
    assert isinstance(one, HttpURI)
    assert (one.filename, one.archive, one.url) == (
        "model v1.gguf",
        False,
        "https://example.com/a/model%20v1.gguf?sig=1",
    )
    assert parse_source("https://h/w.tar.gz").archive
    assert parse_source("http://127.0.0.1:8/w.TGZ").archive
    with pytest.raises(SourceURIError, match="must name a file"):
        parse_source("https://example.com/models/")
    assert parse_source("file:///data/w") == FileURI("file:///data/w", Path("/data/w"))
    assert parse_source("file://localhost/data/w").path == Path("/data/w")
    assert parse_source("file://w/x", base_dir=tmp_path).path == tmp_path / "w" / "x"
    with pytest.raises(SourceURIError, match="relative file:// path; give a base directory"):
        parse_source("file://w/x")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("azure://acct/c/p", "azure:// sources are not supported by the bisllm mirror yet"),
        ("bt://project@latest", "bt:// sources are not supported by the bisllm mirror yet"),
        ("ftp://h/x", "unsupported scheme 'ftp://'"),
        ("Qwen/Qwen3-8B", "has no scheme"),
    ],
)
def test_unsupported_uris(uri: str, message: str) -> None:
    with pytest.raises(SourceURIError, match=message) as info:
        parse_source(uri)
    assert uri in str(info.value)


# ---------------------------------------------------------------------------------------------
# Patterns


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.json", "config.json", True),
        ("*.json", "original/params.json", False),  # '*.x' is top level only
        ("**/*.json", "config.json", True),  # '**' matches zero segments
        ("**/*.json", "a/b/c/params.json", True),
        ("original/*", "original/x.pth", True),
        ("original/*", "original/a/x.pth", False),
        ("original/**", "original/a/x.pth", True),
        ("original/**", "original", False),  # trailing '**' is "inside"
        ("original/", "original/a/x.pth", True),
        ("a/**/z.bin", "a/z.bin", True),
        ("a/**/z.bin", "a/b/c/z.bin", True),
        ("a/**/z.bin", "b/a/z.bin", False),
        ("model-0000[1-3]-of-*.safetensors", "model-00002-of-00009.safetensors", True),
        ("model-0000[1-3]-of-*.safetensors", "model-00004-of-00009.safetensors", False),
        ("?.bin", "a.bin", True),
        ("?.bin", "ab.bin", False),
        ("*", "a/b", False),
        ("**", "a/b", True),
        ("/config.json", "config.json", True),
        ("./config.json", "config.json", True),
        ("Config.json", "config.json", False),  # case-sensitive
        ("**/**/x", "x", True),
    ],
)
def test_pattern_semantics(pattern: str, path: str, expected: bool) -> None:
    assert PathFilter([pattern]).matches(path) is expected


def test_allow_and_ignore() -> None:
    keep_all = PathFilter()
    assert keep_all.matches("anything/at/all.bin")
    assert not PathFilter([]).matches("config.json")  # an empty allow list keeps nothing
    rule = PathFilter(["*.json", "*.safetensors"], ["tokenizer*"])
    assert [p for p in FILES if rule.matches(p)] == ["config.json", "model.safetensors"]
    assert not PathFilter(["**"], ["**/*.pth"]).matches("original/consolidated.pth")  # ignore wins
    assert "allow=('*.json',)" in repr(PathFilter(["*.json"]))


segment = st.text(alphabet="abcxyz._-", min_size=1, max_size=6).filter(lambda s: s not in (".",))
paths = st.lists(segment, min_size=1, max_size=5).map("/".join)


@given(paths)
def test_star_never_crosses_slash(path: str) -> None:
    depth = path.count("/") + 1
    assert PathFilter(["*"]).matches(path) is (depth == 1)
    assert PathFilter(["*/*"]).matches(path) is (depth == 2)
    assert PathFilter(["**"]).matches(path)
    name = path.rsplit("/", 1)[-1]
    assert PathFilter([f"**/{name}"]).matches(path)  # any depth, including the top
    assert PathFilter([name]).matches(path) is (depth == 1)


@given(paths, st.lists(st.sampled_from(["*", "**", "a*", "*.x", "**/b*", "c/**"]), max_size=3))
def test_ignore_always_wins(path: str, patterns: list[str]) -> None:
    assert not PathFilter(patterns, patterns).matches(path)
    assert PathFilter(None, patterns).matches(path) is not PathFilter(patterns).matches(path)


def test_many_double_stars_stay_fast() -> None:
    path = "/".join(["a"] * 40) + "/b"
    assert not PathFilter(["**/" * 20 + "c"]).matches(path)  # memoized: not 2^40 steps


# ---------------------------------------------------------------------------------------------
# Secrets and credentials


def test_secret_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = secrets_dir(tmp_path, hf=HF_TOKEN, blank="  ")
    assert store.get("hf") == HF_TOKEN  # trailing newline stripped
    with pytest.raises(SecretNotFoundError, match=r"secret 'nope' not found: expected a file at"):
        store.get("nope")
    with pytest.raises(CredentialsError, match="is empty"):
        store.get("blank")
    with pytest.raises(CredentialsError, match=r"invalid secret name '\.\./hf'"):
        store.get("../hf")
    (store.directory / "binary").write_bytes(b"\xff" + HF_TOKEN.encode())
    with pytest.raises(CredentialsError, match="is not UTF-8 text") as info:
        store.get("binary")
    assert_no_leak(info.value)
    monkeypatch.setenv("BISLLM_SECRETS_DIR", str(store.directory))
    assert SecretStore.from_env().get("hf") == HF_TOKEN
    monkeypatch.delenv("BISLLM_SECRETS_DIR")
    assert SecretStore.from_env().directory == Path("/secrets")


def test_s3_credentials_format() -> None:
    creds = parse_s3_credentials(
        json.dumps({"aws_access_key_id": "AKIA1", "aws_secret_access_key": SECRET_KEY}),
        secret_name="s3",
    )
    assert (creds.access_key_id, creds.secret_access_key) == ("AKIA1", SECRET_KEY)
    assert (creds.region, creds.session_token) == ("us-east-1", None)
    full = parse_s3_credentials(
        json.dumps(
            {
                "aws_access_key_id": "AKIA1",
                "aws_secret_access_key": SECRET_KEY,
                "aws_region": "eu-west-1",
                "aws_session_token": SECRET_KEY + "-token",
            }
        ),
        secret_name="s3",
    )
    assert (full.region, full.session_token) == ("eu-west-1", SECRET_KEY + "-token")
    assert_no_leak(creds, full, secrets=(SECRET_KEY, "AKIA1"))
    assert "<redacted>" in repr(full)
    assert (
        parse_r2_credentials(
            json.dumps({"aws_access_key_id": "k", "aws_secret_access_key": SECRET_KEY}),
            secret_name="r2",
        ).region
        == "auto"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"aws_access_key_id": "AKIA1"}, S3_KEYS_REQUIRED),
        ({"aws_secret_access_key": SECRET_KEY, "aws_access_key_id": ""}, S3_KEYS_REQUIRED),
        ({"AWS_ACCESS_KEY_ID": "a", "aws_secret_access_key": SECRET_KEY}, "unknown keys"),
        ({SECRET_KEY: "x"}, r"unknown keys \(1 other\(s\)\)"),  # odd names are not echoed
        ({"aws_access_key_id": 1, "aws_secret_access_key": SECRET_KEY}, "must be a string"),
        ([SECRET_KEY], "is JSON list, not an object"),
        (f"{{aws_secret_access_key: {SECRET_KEY}}}", "is not valid JSON"),
    ],
)
def test_s3_credentials_errors(value: object, message: str) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(CredentialsError, match=message) as info:
        parse_s3_credentials(text, secret_name="weights-s3")
    assert "'weights-s3'" in str(info.value)
    assert_no_leak(info.value)


def test_gcs_credentials() -> None:
    hmac = parse_gcs_credentials(
        json.dumps({"aws_access_key_id": "GOOG1", "aws_secret_access_key": SECRET_KEY}),
        secret_name="gcs",
    )
    assert hmac.region == "auto"
    service_account = {
        "type": "service_account",
        "client_email": "x@p.iam.gserviceaccount.com",
        "private_key": f"-----BEGIN PRIVATE KEY-----{SECRET_KEY}",
    }
    with pytest.raises(CredentialsError, match="not supported yet: use HMAC interoperability keys"):
        parse_gcs_credentials(json.dumps(service_account), secret_name="gcs")


def test_tokens() -> None:
    token = parse_token(f"  {HF_TOKEN}\n", secret_name="hf")
    assert token == BearerToken(HF_TOKEN, "hf")
    assert_no_leak(token)
    for bad, message in [("a b", "contains whitespace"), ('{"t": 1}', "looks like JSON")]:
        with pytest.raises(CredentialsError, match=message):
            parse_token(bad, secret_name="hf")


def test_spec_errors_for_missing_credentials(tmp_path: Path) -> None:
    for uri in ("s3://b/p", "r2://acct.b/p"):
        with pytest.raises(CredentialsError, match=f"^{SECRET_ID_REQUIRED}"):
            resolve_credentials(parse_source(uri))
        with pytest.raises(SourceAuthError, match=f"^{uri}: {SECRET_ID_REQUIRED}"):
            open_source(uri)
    with pytest.raises(SourceAuthError, match=f"gs://b/p: {NO_GCS_CREDENTIALS}"):
        open_source("gs://b/p")
    # Public sources need nothing.
    assert resolve_credentials(parse_source("hf://a/b")) is None
    assert resolve_credentials(parse_source("https://h/x.bin")) is None
    # OIDC and assume-role need the platform's identity: refused clearly.
    with pytest.raises(SourceAuthError, match="auth_method AWS_OIDC is not supported"):
        open_source("s3://b/p", auth={"auth_method": "aws_oidc", "aws_oidc_role_arn": "arn"})
    store = secrets_dir(tmp_path, one="x", two="y")
    with pytest.raises(SourceAuthError, match="two secrets named"):
        open_source("hf://a/b", auth={"auth_secret_name": "one"}, secret_name="two", secrets=store)
    with pytest.raises(SourceAuthError, match="file:// sources are read without credentials"):
        open_source("file:///tmp", secret_name="one", secrets=store)


def test_missing_secret_file_names_the_source_and_secret(tmp_path: Path) -> None:
    store = secrets_dir(tmp_path)
    auth = {"auth_method": "CUSTOM_SECRET", "auth_secret_name": "aws-weights"}
    with pytest.raises(SourceAuthError, match=r"^s3://b/p: secret 'aws-weights' not found"):
        open_source("s3://b/p", auth=auth, secrets=store)


# ---------------------------------------------------------------------------------------------
# file://


def test_file_source(tmp_path: Path) -> None:
    root = tmp_path / "model"
    write_tree(root, FILES)
    source = open_source(f"file://{root}")
    assert read_all(source) == FILES
    listing = {f.path: f for f in source.list_files()}
    stat = (root / "config.json").stat()
    assert listing["config.json"].etag == f"{stat.st_size}-{stat.st_mtime_ns}"
    assert source.pin() is None
    with source.open("model.safetensors", offset=1000) as handle:
        assert handle.read() == FILES["model.safetensors"][1000:]
    relative = open_source("file://model", base_dir=tmp_path, allow_patterns=["**/*.json"])
    assert [f.path for f in relative.list_files()] == [
        "config.json",
        "original/params/extra.json",
        "tokenizer.json",
    ]
    single = open_source(f"file://{root}/config.json")
    assert read_all(single) == {"config.json": FILES["config.json"]}


def test_file_source_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "model"
    write_tree(root, {"a/w.bin": b"w", "b.json": b"{}"})
    (root / "inside.bin").symlink_to(root / "a" / "w.bin")
    (root / "linked").symlink_to(root / "a")
    source = open_source(f"file://{root}")
    assert read_all(source) == {
        "a/w.bin": b"w",
        "b.json": b"{}",
        "inside.bin": b"w",
        "linked/w.bin": b"w",
    }
    (tmp_path / "outside.txt").write_text("secret-ish")
    (root / "escape.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(SourceError, match=r"symlink 'escape\.txt' points outside the source root"):
        source.list_files()
    with pytest.raises(SourceError, match=r"'escape\.txt' leads outside the source root") as info:
        source.open("escape.txt")
    assert str(info.value).startswith(f"file://{root}: ")
    # An ignored escaping file link is never followed, so it is no error.
    assert "escape.txt" not in {
        f.path for f in open_source(f"file://{root}", ignore_patterns=["escape.txt"]).list_files()
    }
    with pytest.raises(SourceError, match="is not a safe relative file path"):
        source.open("../outside.txt")
    with pytest.raises(SourceError, match=r"no file 'a/missing\.bin'"):
        source.open("a/missing.bin")
    (root / "escape.txt").unlink()
    (root / "a" / "loop").symlink_to(root)
    with pytest.raises(SourceError, match="loops back"):
        source.list_files()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"file://{tmp_path}/missing").list_files()


# ---------------------------------------------------------------------------------------------
# S3, R2 and GCS (moto)


def s3_secret(tmp_path: Path, value: dict[str, str], name: str = "s3") -> SecretStore:
    return secrets_dir(tmp_path, **{name: json.dumps(value)})


def test_s3_source(moto_s3_server: MotoS3, tmp_path: Path) -> None:
    s3 = moto_s3_server
    s3.put_files("weights", {f"models/llama/{k}": v for k, v in FILES.items()})
    s3.put_files(
        "weights",
        {"models/llama-2/config.json": b"other", "models/llama/folder/": b"", "top.txt": b"t"},
    )
    store = s3_secret(tmp_path, s3.secret)
    endpoints = Endpoints(s3=s3.endpoint)
    source = open_source(
        "s3://weights/models/llama", secret_name="s3", secrets=store, endpoints=endpoints
    )
    assert read_all(source) == FILES  # llama-2/ and the folder marker are not part of it
    etags = {f.path: f.etag for f in source.list_files()}
    assert etags["config.json"] == hashlib.md5(FILES["config.json"]).hexdigest()
    with source.open("model.safetensors", offset=123_456) as handle:
        assert handle.read() == FILES["model.safetensors"][123_456:]
    filtered = open_source(
        "s3://weights/models/llama/",
        auth={"auth_method": "CUSTOM_SECRET", "auth_secret_name": "s3"},
        secrets=store,
        endpoints=endpoints,
        allow_patterns=["*.json", "original/**"],
        ignore_patterns=["**/extra.json"],
    )
    assert [f.path for f in filtered.list_files()] == [
        "config.json",
        "original/consolidated.pth",
        "tokenizer.json",
    ]
    whole = open_source("s3://weights", secret_name="s3", secrets=store, endpoints=endpoints)
    assert "top.txt" in {f.path for f in whole.list_files()}
    with pytest.raises(SourceError, match=r"^s3://weights/models/llama: reading 'nope.bin'"):
        source.open("nope.bin")
    missing = open_source(
        "s3://no-such-bucket", secret_name="s3", secrets=store, endpoints=endpoints
    )
    with pytest.raises(SourceError, match="bucket 'no-such-bucket' does not exist"):
        missing.list_files()
    source.close()


def test_r2_and_gs_map_onto_s3_endpoints(moto_s3_server: MotoS3, tmp_path: Path) -> None:
    s3 = moto_s3_server
    s3.put_files("r2-bucket", {"q/w/config.json": b"r2"})
    s3.put_files("gcs-bucket", {"m/config.json": b"gs", "m/sub/a.bin": b"a"})
    store = s3_secret(tmp_path, s3.secret)
    # The account id only picks the endpoint host, which loopback cannot vary: check it apart.
    real_r2 = open_source("r2://acct42.b/x", secret_name="s3", secrets=store)
    assert isinstance(real_r2, S3Source)
    assert real_r2.endpoint == "https://acct42.r2.cloudflarestorage.com"
    endpoints = Endpoints(gcs=s3.endpoint, r2_template=s3.endpoint)
    r2 = open_source(
        "r2://acct42.r2-bucket/q/w", secret_name="s3", secrets=store, endpoints=endpoints
    )
    assert read_all(r2) == {"config.json": b"r2"}
    gs = open_source("gs://gcs-bucket/m", secret_name="s3", secrets=store, endpoints=endpoints)
    assert read_all(gs) == {"config.json": b"gs", "sub/a.bin": b"a"}


def test_s3_bad_credentials(moto_s3_server: MotoS3, tmp_path: Path) -> None:
    s3 = moto_s3_server
    s3.put_files("private", {"w/config.json": b"{}"})
    endpoints = Endpoints(s3=s3.endpoint)
    with s3.require_auth() as good:
        ok = open_source(
            "s3://private/w",
            secret_name="s3",
            secrets=s3_secret(tmp_path, good),
            endpoints=endpoints,
        )
        assert read_all(ok) == {"config.json": b"{}"}
        for name, value in [
            (
                "unknown-key",
                {"aws_access_key_id": "AKIAUNKNOWN", "aws_secret_access_key": SECRET_KEY},
            ),
            ("wrong-secret", {**good, "aws_secret_access_key": SECRET_KEY}),
        ]:
            store = s3_secret(tmp_path, value, name)
            source = open_source(
                "s3://private/w", secret_name=name, secrets=store, endpoints=endpoints
            )
            with pytest.raises(SourceAuthError) as info:
                source.list_files()
            message = str(info.value)
            assert message.startswith("s3://private/w: listing the bucket was refused")
            assert f"secret '{name}'" in message
            assert_no_leak(info.value, source)
            with pytest.raises(SourceAuthError, match=r"reading 'config\.json' was refused"):
                source.open("config.json")


# ---------------------------------------------------------------------------------------------
# https (single file and tar.gz)


def test_https_single_file(range_server: RangeServer) -> None:
    data = FILES["model.safetensors"]
    (range_server.root / "w").mkdir()
    (range_server.root / "w" / "model.safetensors").write_bytes(data)
    uri = range_server.url_for("w/model.safetensors")
    source = open_source(uri)
    [file] = source.list_files()
    stat = (range_server.root / "w" / "model.safetensors").stat()
    assert file == RemoteFile(
        "model.safetensors", len(data), f"{stat.st_size:x}-{stat.st_mtime_ns:x}"
    )
    assert read_all(source) == {"model.safetensors": data}
    range_server.clear()
    with source.open("model.safetensors", offset=250_000) as handle:
        assert handle.read() == data[250_000:]
    [request] = range_server.requests
    assert (request.method, request.range, request.status) == ("GET", "bytes=250000-", 206)
    # A connection dropped mid-body is a SourceError naming the source and the progress.
    range_server.cut_after(10_000)
    with source.open("model.safetensors") as handle, pytest.raises(SourceError) as info:
        handle.read()
    assert str(info.value).startswith(f"{uri}: reading 'model.safetensors' failed after")
    assert open_source(uri, ignore_patterns=["*.safetensors"]).list_files() == []
    with pytest.raises(SourceError, match=r"no file 'other\.bin'"):
        source.open("other.bin")
    with pytest.raises(SourceError, match="not found"):
        open_source(range_server.url_for("missing.bin")).list_files()
    range_server.fail_with(500)
    with pytest.raises(SourceError, match="HTTP 500"):
        source.list_files()


def test_https_auth(range_server: RangeServer, tmp_path: Path) -> None:
    (range_server.root / "w.bin").write_bytes(b"weights")
    range_server.require_token = "let-me-in"
    store = secrets_dir(tmp_path, good="let-me-in", bad=HF_TOKEN)
    uri = range_server.url_for("w.bin")
    assert read_all(open_source(uri, secret_name="good", secrets=store)) == {"w.bin": b"weights"}
    with pytest.raises(SourceAuthError, match=r"refused \(HTTP 401\).*set auth_secret_name"):
        open_source(uri).list_files()
    wrong = open_source(uri, secret_name="bad", secrets=store)
    with pytest.raises(SourceAuthError, match=r"refused \(HTTP 403\).*secret 'bad'") as info:
        wrong.list_files()
    assert_no_leak(info.value, wrong)
    with pytest.raises(SourceAuthError) as info:
        wrong.open("w.bin")
    assert_no_leak(info.value)


def test_range_server_semantics(range_server: RangeServer) -> None:
    (range_server.root / "f.bin").write_bytes(bytes(range(100)))
    url = range_server.url_for("f.bin")
    head = httpx.head(url)
    assert (head.status_code, head.headers["Content-Length"]) == (200, "100")
    assert head.headers["ETag"].startswith('"64-')
    cases = {
        "bytes=10-19": (206, "bytes 10-19/100", bytes(range(10, 20))),
        "bytes=90-": (206, "bytes 90-99/100", bytes(range(90, 100))),
        "bytes=-5": (206, "bytes 95-99/100", bytes(range(95, 100))),
        "bytes=95-500": (206, "bytes 95-99/100", bytes(range(95, 100))),
        "bytes=100-": (416, "bytes */100", b""),
        "bytes=5-1": (416, "bytes */100", b""),
        "bytes=0-1,5-6": (416, "bytes */100", b""),
        "items=0-1": (416, "bytes */100", b""),
    }
    for value, (status, content_range, body) in cases.items():
        response = httpx.get(url, headers={"Range": value})
        assert (response.status_code, response.headers["Content-Range"]) == (status, content_range)
        assert response.content == body
    assert [r.range for r in range_server.requests[1:]] == list(cases)
    range_server.honor_ranges = False
    assert httpx.get(url, headers={"Range": "bytes=1-2"}).status_code == 200
    range_server.fail_with(503, path="/f.bin")
    assert httpx.get(url).status_code == 503
    assert httpx.get(url).status_code == 200  # once only
    range_server.cut_after(7)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    assert httpx.get(url).content == bytes(range(100))
    assert httpx.get(range_server.url_for("../etc/passwd")).status_code == 404


def test_https_offset_when_the_server_ignores_ranges(range_server: RangeServer) -> None:
    data = os.urandom(5000)
    (range_server.root / "w.bin").write_bytes(data)
    range_server.honor_ranges = False
    source = open_source(range_server.url_for("w.bin"))
    with source.open("w.bin", offset=1234) as handle:
        assert handle.read() == data[1234:]
    assert range_server.requests[-1].status == 200


def make_archive(path: Path, members: dict[str, bytes], *, prefix: str = "./") -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_https_archive(range_server: RangeServer) -> None:
    make_archive(range_server.root / "model.tar.gz", FILES)
    uri = range_server.url_for("model.tar.gz")
    source = open_source(uri)
    listing = source.list_files()
    assert [f.path for f in listing] == sorted(FILES)
    assert all(f.etag and f.etag.endswith(f":{f.path}") for f in listing)
    assert read_all(source) == FILES
    with source.open("original/consolidated.pth", offset=5) as handle:
        assert handle.read() == FILES["original/consolidated.pth"][5:]
    with pytest.raises(SourceError, match="no member 'nope' in the archive"):
        source.open("nope")
    only_json = open_source(uri, allow_patterns=["**/*.json"], ignore_patterns=["tokenizer.json"])
    assert [f.path for f in only_json.list_files()] == ["config.json", "original/params/extra.json"]
    make_archive(range_server.root / "plain.tgz", {"a.bin": b"a"}, prefix="")
    assert read_all(open_source(range_server.url_for("plain.tgz"))) == {"a.bin": b"a"}


def test_https_archive_refuses_unsafe_members(range_server: RangeServer) -> None:
    make_archive(range_server.root / "evil.tar.gz", {"../evil.sh": b"x"}, prefix="")
    with pytest.raises(SourceError, match=r"'\.\./evil\.sh' escapes the archive root"):
        open_source(range_server.url_for("evil.tar.gz")).list_files()
    with tarfile.open(range_server.root / "link.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(SourceError, match="'link' is a link or special file"):
        open_source(range_server.url_for("link.tar.gz")).list_files()
    (range_server.root / "junk.tar.gz").write_bytes(b"not an archive at all" * 100)
    with pytest.raises(SourceError, match="not a readable tar archive"):
        open_source(range_server.url_for("junk.tar.gz")).list_files()


# ---------------------------------------------------------------------------------------------
# Hugging Face (fake hub)


@pytest.fixture
def hub(fake_hub_server: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    # HF_HUB_OFFLINE would block even loopback requests; these tests never leave the machine.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return fake_hub_server


def test_hf_source_pins_branch_to_commit(hub: FakeHub) -> None:
    hub.page_size = 2  # make list_repo_tree follow Link pages
    repo = hub.add_repo("org/tiny")
    first = repo.commit(FILES)
    endpoints = Endpoints(hf=hub.url)
    source = open_source("hf://org/tiny", endpoints=endpoints)
    assert source.pin() == first
    second = repo.commit({**FILES, "config.json": b'{"new": true}', "added.txt": b"+"})
    assert second != first
    # The source stays on the commit it pinned, even though main moved.
    assert source.pin() == first
    assert read_all(source) == FILES
    listing = {f.path: f for f in source.list_files()}
    assert (
        listing["model.safetensors"].etag == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    )
    assert (
        listing["config.json"].etag
        == hashlib.sha1(b"blob %d\0" % len(FILES["config.json"]) + FILES["config.json"]).hexdigest()
    )
    assert any(r.path.startswith("/cdn/") for r in hub.requests)  # LFS redirect followed
    assert any("cursor=" in r.path for r in hub.requests)  # tree pages followed
    fresh = open_source(
        "hf://org/tiny@main", endpoints=endpoints, allow_patterns=["*.json", "*.txt"]
    )
    assert fresh.pin() == second
    assert read_all(fresh) == {
        "added.txt": b"+",
        "config.json": b'{"new": true}',
        "tokenizer.json": FILES["tokenizer.json"],
    }
    at_sha = open_source(f"hf://org/tiny@{first}", endpoints=endpoints)
    assert at_sha.pin() == first
    with at_sha.open("model.safetensors", offset=299_000) as handle:
        assert handle.read() == FILES["model.safetensors"][299_000:]
    with pytest.raises(SourceError, match="revision 'nope' not found in org/tiny"):
        open_source("hf://org/tiny@nope", endpoints=endpoints).list_files()
    with pytest.raises(SourceError, match=r"^hf://org/tiny: reading 'missing.bin'"):
        source.open("missing.bin")


def test_hf_private_repo(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/private", token=HF_TOKEN).commit({"config.json": b"{}"})
    endpoints = Endpoints(hf=hub.url)
    store = secrets_dir(tmp_path, hf=HF_TOKEN, wrong="hf_wrong_but_also_secret")
    good = open_source("hf://org/private", secret_name="hf", secrets=store, endpoints=endpoints)
    assert read_all(good) == {"config.json": b"{}"}
    assert_no_leak(good)
    with pytest.raises(SourceAuthError, match=r"^hf://org/private: .*refused \(HTTP 401\)"):
        open_source("hf://org/private", endpoints=endpoints).pin()
    wrong = open_source("hf://org/private", secret_name="wrong", secrets=store, endpoints=endpoints)
    with pytest.raises(SourceAuthError, match="check the token in secret 'wrong'") as info:
        wrong.list_files()
    assert_no_leak(info.value, wrong, secrets=(HF_TOKEN, "hf_wrong_but_also_secret"))


def test_hf_offline_mode_is_a_source_error(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/tiny").commit({"a": b"a"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="offline mode is enabled"):
        open_source("hf://org/tiny", endpoints=Endpoints(hf=hub.url)).pin()


def test_endpoints_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BISLLM_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:2/")
    assert Endpoints().s3_url() == "http://127.0.0.1:1"
    assert Endpoints().hf_url() == "http://127.0.0.1:2"
    assert Endpoints(hf="http://x").hf_url() == "http://x"
    monkeypatch.delenv("HF_ENDPOINT")
    assert Endpoints().hf_url() == "https://huggingface.co"
