"""Durable run storage: an S3 bucket prefix or a directory on a shared volume, through pyarrow.fs.

`--storage s3://bucket/prefix` or `--storage /shared/path`. The S3 credentials come from the
standard AWS places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else the
shared credentials file and AWS_PROFILE; AWS_ENDPOINT_URL for an S3-compatible endpoint),
resolved once in the parent and handed to the training child in its job on stdin, so a
Ray-placed worker gets them without an environment variable or a command line. They never
appear in a file, log or message: every error passes through `_clean`, which removes them.
"""

from __future__ import annotations

import configparser
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from qlorax import settings
from qlorax.errors import ConfigError, QloraxError, ResourceError, condense

# How long one storage operation is retried before the run gives up on the store (seconds);
# QLORAX_STORAGE_RETRY_SECONDS changes it (tests use a short one).
DEFAULT_RETRY_SECONDS = 60.0


class StorageError(QloraxError):
    """The store refused or could not be reached (exit 3; 2 for a bad URI, bucket or credentials)."""


@dataclass(frozen=True)
class StorageSpec:
    """Where a run's durable copy lives, and how to reach it (credentials are never serialised
    anywhere but the child's job on stdin)."""

    uri: str
    s3: dict[str, str] = field(default_factory=dict)  # access_key, secret_key, session_token, endpoint, region

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def to_payload(self) -> dict[str, Any]:
        return {"uri": self.uri, "s3": dict(self.s3)}

    @classmethod
    def from_payload(cls, data: dict[str, Any] | None) -> StorageSpec | None:
        return cls(str(data["uri"]), dict(data.get("s3") or {})) if data else None

    def secrets(self) -> list[str]:
        return [value for key, value in self.s3.items() if key in ("secret_key", "session_token") and value]


def is_storage_uri(text: str | Path) -> bool:
    """True for an s3:// URI (a path is a storage location only where --storage says so)."""
    return str(text).startswith("s3://")


def resolve_storage(uri: str) -> StorageSpec:
    """Check the URI's shape and resolve S3 credentials from the standard AWS places (exit 2 when
    the URI is malformed or a credentials file names a missing profile)."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc or parsed.query or parsed.fragment:
            raise ConfigError(f"--storage {uri}: expected s3://BUCKET/PREFIX")
        return StorageSpec(uri.rstrip("/"), _aws_credentials())
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"--storage {uri}: only s3://BUCKET/PREFIX or a directory on a shared volume is supported")
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    return StorageSpec(str(path))


def _aws_credentials() -> dict[str, str]:
    found: dict[str, str] = {}
    access, secret = settings.get("AWS_ACCESS_KEY_ID"), settings.get("AWS_SECRET_ACCESS_KEY")
    if access and secret:
        found.update(access_key=access, secret_key=secret)
        if settings.get("AWS_SESSION_TOKEN"):
            found["session_token"] = str(settings.get("AWS_SESSION_TOKEN"))
    else:
        found.update(_shared_credentials_file())
    endpoint = settings.get("AWS_ENDPOINT_URL_S3") or settings.get("AWS_ENDPOINT_URL")
    if endpoint:
        found["endpoint"] = endpoint
    region = settings.get("AWS_REGION") or settings.get("AWS_DEFAULT_REGION")
    if region:
        found["region"] = region
    return found


def _shared_credentials_file() -> dict[str, str]:
    """The profile's keys from ~/.aws/credentials (or AWS_SHARED_CREDENTIALS_FILE); none when absent,
    and then pyarrow's own chain (instance metadata, web identity) is tried."""
    path = Path(settings.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials").expanduser()
    profile = settings.get("AWS_PROFILE") or "default"
    if not path.is_file():
        return {}
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable AWS credentials file ({type(exc).__name__})") from None
    if not parser.has_section(profile):
        if settings.get("AWS_PROFILE"):
            raise ConfigError(f"AWS_PROFILE={profile}: {path} has no [{profile}] section")
        return {}
    section = parser[profile]
    keys = {"access_key": section.get("aws_access_key_id", ""), "secret_key": section.get("aws_secret_access_key", "")}
    if section.get("aws_session_token"):
        keys["session_token"] = section["aws_session_token"]
    return {k: v for k, v in keys.items() if v}


class RunStore:
    """One run's durable location: files addressed by their path relative to the run directory."""

    def __init__(self, spec: StorageSpec) -> None:
        self.spec = spec
        self.fs, self.root = _filesystem(spec)
        self.retry_seconds = float(settings.get("QLORAX_STORAGE_RETRY_SECONDS") or DEFAULT_RETRY_SECONDS)

    def _path(self, rel: str) -> str:
        return str(PurePosixPath(self.root, rel)) if rel else self.root

    def put_bytes(self, rel: str, data: bytes) -> None:
        def write() -> None:
            self.fs.create_dir(str(PurePosixPath(self._path(rel)).parent), recursive=True)
            with self.fs.open_output_stream(self._path(rel)) as out:
                out.write(data)
        self._retrying(f"writing {rel}", write)

    def put_file(self, local: Path, rel: str) -> None:
        self.put_bytes(rel, Path(local).read_bytes())

    def get_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self._path(rel)) as handle:
                return bytes(handle.read())
        return self._retrying(f"reading {rel}", read)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        info = self._retrying(f"looking up {rel}", lambda: self.fs.get_file_info(self._path(rel)))
        return bool(info.type == pafs.FileType.File)

    def listing(self, rel: str = "") -> list[str]:
        """Every file under rel, as paths relative to the run's root, sorted."""
        import pyarrow.fs as pafs

        def walk() -> list[Any]:
            return self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=True, allow_not_found=True))
        infos = self._retrying(f"listing {rel or 'the run'}", walk)
        prefix = self.root.rstrip("/") + "/"
        return sorted(i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix))

    def check(self) -> None:
        """Before anything is written: the bucket exists and takes these credentials (S3), or the
        directory can be made (a shared path). Exit 2 when refused, 3 when the store does not answer."""
        import pyarrow.fs as pafs

        if not self.spec.is_s3:
            self._retrying("creating the storage directory", lambda: self.fs.create_dir(self.root, recursive=True))
            return
        bucket = self.root.split("/", 1)[0]
        info = self._retrying("looking up the bucket", lambda: self.fs.get_file_info(bucket))
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"--storage {self.spec.uri}: the bucket {bucket} does not exist (create it first)")
        self.listing()  # the prefix may be read with these credentials

    def delete_dir(self, rel: str) -> None:
        self._retrying(f"deleting {rel}", lambda: self.fs.delete_dir(self._path(rel)))

    def delete_file(self, rel: str) -> None:
        self._retrying(f"deleting {rel}", lambda: self.fs.delete_file(self._path(rel)))

    def _retrying(self, what: str, operation: Any) -> Any:
        """Run one storage operation, retrying a store that does not answer for retry_seconds; a
        refusal (no bucket, bad credentials, not found) is not retried."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return operation()
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as exc:
                message = self._clean(str(exc))
                refused = _refusal(message)
                if refused is not None:
                    raise StorageError(f"--storage {self.spec.uri}: {refused} (while {what}): {condense(message)}",
                                       exit_code=2) from None
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"--storage {self.spec.uri}: the store did not answer for "
                                       f"{self.retry_seconds:.0f} s (while {what}): {condense(message)}",
                                       exit_code=ResourceError.exit_code) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _clean(self, text: str) -> str:
        for secret in self.spec.secrets():
            text = text.replace(secret, "[redacted]")
        return text


def _refusal(message: str) -> str | None:
    """What a refusing store said, in words; None for an error worth retrying."""
    lowered = message.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or (
            "bucket" in lowered and "not found" in lowered):
        return "the bucket does not exist (create it first)"
    for marker in ("signature_does_not_match", "signaturedoesnotmatch", "invalidaccesskeyid", "access_denied",
                   "accessdenied", "invalid_access_key", "forbidden", "403"):
        if marker in lowered:
            return ("the store refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
                    "shared credentials file)")
    if "permission denied" in lowered or "read-only file system" in lowered:
        return "the location is not writable"
    return None


def _filesystem(spec: StorageSpec) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if not spec.is_s3:
        return pafs.LocalFileSystem(), spec.uri
    parsed = urlparse(spec.uri)
    options: dict[str, Any] = {"connect_timeout": 5, "request_timeout": 30,
                               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
    s3 = spec.s3
    if s3.get("access_key"):
        options.update(access_key=s3["access_key"], secret_key=s3.get("secret_key", ""))
        if s3.get("session_token"):
            options["session_token"] = s3["session_token"]
    if s3.get("endpoint"):
        endpoint = urlparse(s3["endpoint"] if "://" in s3["endpoint"] else f"https://{s3['endpoint']}")
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    options["region"] = s3.get("region") or "us-east-1"
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
