"""Where a path lives: a local path, or an object in S3 (``s3://bucket/key``) through pyarrow.

The one seam between the pipeline and object storage. :func:`location` turns a
path string into a local :class:`~pathlib.Path` or an :class:`ObjectPath`;
:func:`filesystem` gives what pyarrow reads it with (``None`` and the path
itself for a local path, so local reads stay exactly as they were; the S3 file
system and ``bucket/key`` for an object). Everything that touches an object
goes through here, and every failure of the object store becomes one
:class:`~flows.errors.DataError` line naming the object and, for a connection
problem, the endpoint.

The S3 file system is configured from the standard AWS environment, nothing of
ours: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
(else the SDK's usual credential chain: profile, instance or container role),
``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), ``AWS_ENDPOINT_URL`` (an
S3-compatible store such as MinIO: ``http://host:9000``), ``AWS_ALLOW_HTTP``
(``true``: plain HTTP to an endpoint given without a scheme) and
``AWS_MAX_ATTEMPTS`` (default 3). Retries are capped and timeouts set
(:data:`CONNECT_TIMEOUT_SECONDS`, :data:`REQUEST_TIMEOUT_SECONDS`), so an
unreachable endpoint fails in well under a minute instead of retrying for ever.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from flows.errors import DataError

SCHEME = "s3://"
# A connection must open within 5 s; a request fails once it transferred nothing for
# 10 s (a stalled server), never because a large object takes long. With the default
# of 3 attempts, one request gives up after at most ~35 s.
CONNECT_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_ATTEMPTS = 3
_TRUE = ("1", "true", "yes", "on")


class ObjectPath(PurePosixPath):
    """An object or a prefix in a bucket: ``bucket/key`` as a path, shown as ``s3://bucket/key``.

    Joining (``/``), ``name``, ``parent`` and ``suffix`` work as for a local path; I/O
    goes through this module. ``key_path`` is the ``bucket/key`` form pyarrow takes.
    """

    def __str__(self) -> str:
        return SCHEME + super().__str__()

    @property
    def key_path(self) -> str:
        return super().__str__()

    @property
    def bucket(self) -> str:
        return self.parts[0]

    @property
    def key(self) -> str:
        return "/".join(self.parts[1:])


def uri(path: PurePath) -> str:
    """A link to ``path``: ``s3://bucket/key``, or ``file://`` and the absolute local path."""
    return str(path) if isinstance(path, ObjectPath) else Path(path).resolve().as_uri()


def is_remote(path: str | PurePath) -> bool:
    """Whether ``path`` names an object in S3 (an ``s3://`` URL or an :class:`ObjectPath`)."""
    return isinstance(path, ObjectPath) or str(path).startswith(SCHEME)


def location(path: str | PurePath) -> Path | ObjectPath:
    """``path`` as a local :class:`Path` or, for ``s3://bucket/key``, an :class:`ObjectPath`."""
    if isinstance(path, ObjectPath):
        return path
    text = str(path)
    if not text.startswith(SCHEME):
        return Path(text)
    rest = text[len(SCHEME) :].strip("/")
    if not rest or rest.startswith("/"):
        raise DataError("an s3:// URL needs a bucket: s3://bucket/prefix/...", path=text)
    return ObjectPath(rest)


def filesystem(path: str | PurePath) -> tuple[pafs.FileSystem | None, Any]:
    """What pyarrow reads ``path`` with: ``(None, path)`` for a local path (pyarrow's own
    handling, unchanged), ``(S3 file system, "bucket/key")`` for an object."""
    where = location(path)
    if isinstance(where, ObjectPath):
        return s3(), where.key_path
    return None, path


def s3() -> pafs.S3FileSystem:
    """The S3 file system of the current AWS environment (one per distinct environment)."""
    return _s3(*_settings())


def _settings() -> tuple[str | None, ...]:
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ALLOW_HTTP",
        "AWS_MAX_ATTEMPTS",
    )
    return tuple(os.environ.get(name) or None for name in names)


@lru_cache(maxsize=8)
def _s3(
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
    region: str | None,
    default_region: str | None,
    endpoint_url: str | None,
    allow_http: str | None,
    max_attempts: str | None,
) -> pafs.S3FileSystem:
    options: dict[str, Any] = {}
    if access_key and secret_key:  # else the SDK's credential chain (profile, role, ...)
        options.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    if region or default_region:
        options["region"] = region or default_region
    scheme, host = _endpoint(endpoint_url, allow_http)
    if host is not None:
        options["endpoint_override"] = host
    try:
        attempts = max(1, int(max_attempts or DEFAULT_MAX_ATTEMPTS))
    except ValueError:
        raise DataError(f"AWS_MAX_ATTEMPTS is not a number: {max_attempts!r}") from None
    return pafs.S3FileSystem(
        scheme=scheme,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        request_timeout=REQUEST_TIMEOUT_SECONDS,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
        **options,
    )


def _endpoint(endpoint_url: str | None, allow_http: str | None) -> tuple[str, str | None]:
    """``(scheme, host[:port])`` of ``AWS_ENDPOINT_URL``; ``AWS_ALLOW_HTTP`` for a bare host."""
    http = (allow_http or "").strip().lower() in _TRUE
    if not endpoint_url:
        return ("http" if http else "https"), None
    found = re.fullmatch(r"(?:(https?)://)?([^/]+)/?", endpoint_url.strip())
    if found is None:
        raise DataError(f"AWS_ENDPOINT_URL is not http(s)://host[:port]: {endpoint_url!r}")
    scheme = found.group(1) or ("http" if http else "https")
    return scheme, found.group(2)


def endpoint() -> str:
    """How errors name the object store: the configured endpoint, or AWS S3 and its region."""
    settings = dict(zip(("region", "default_region", "url", "http"), _settings()[3:7], strict=True))
    if settings["url"]:
        scheme, host = _endpoint(settings["url"], settings["http"])
        return f"{scheme}://{host}"
    region = settings["region"] or settings["default_region"]
    return f"AWS S3 ({region})" if region else "AWS S3"


# --- errors --------------------------------------------------------------------------------

_PROBLEMS = (
    ("NO_SUCH_BUCKET", "bucket {bucket!r} does not exist"),
    ("INVALID_ACCESS_KEY_ID", "the access key (AWS_ACCESS_KEY_ID) is not known to {endpoint}"),
    (
        "SIGNATURE_DOES_NOT_MATCH",
        "the secret key (AWS_SECRET_ACCESS_KEY) does not match the access key at {endpoint}",
    ),
    ("INVALID_CLIENT_TOKEN", "the credentials are not valid at {endpoint}"),
    ("EXPIRED_TOKEN", "the credentials have expired ({endpoint})"),
    (
        "ACCESS_DENIED",
        "access denied by {endpoint} (no permission for these credentials, or wrong ones)",
    ),
    ("NETWORK_CONNECTION", "cannot reach the object store at {endpoint} ({detail})"),
    ("Could not connect", "cannot reach the object store at {endpoint} ({detail})"),
    ("NO_SUCH_KEY", "no such object"),
    ("Path does not exist", "no such object"),
)


def object_error(error: BaseException, path: str | PurePath, doing: str = "") -> DataError:
    """The one-line DataError for a failure of the object store at ``path``."""
    text = str(error)
    where = location(path)
    bucket = where.bucket if isinstance(where, ObjectPath) else ""
    for code, problem in _PROBLEMS:
        if code in text:
            detail = _connection_detail(text)
            return DataError(
                problem.format(bucket=bucket, endpoint=endpoint(), detail=detail), path=path
            )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return DataError(f"{doing or 'object store error'} ({first}; {endpoint()})", path=path)


def _connection_detail(text: str) -> str:
    found = re.search(r"curlCode: \d+, ([^;]+)", text)
    return found.group(1).strip() if found else "no answer"


def is_not_found(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, FileNotFoundError) or "NO_SUCH_KEY" in text or "does not exist" in text


@contextmanager
def translated(path: str | PurePath, doing: str = "") -> Iterator[None]:
    """Turn a failure of the object store inside the block into :func:`object_error`."""
    try:
        yield
    except DataError:
        raise
    except (OSError, pa.ArrowException) as error:
        raise object_error(error, path, doing) from None


# --- objects -------------------------------------------------------------------------------


def info(path: ObjectPath) -> pafs.FileInfo:
    """The object's (or prefix's) file info; a missing bucket is an error, a missing key not."""
    with translated(path):
        try:
            found = s3().get_file_info(path.key_path)
        except OSError as error:
            # A refused HEAD has no body, so no reason: a listing of the bucket tells
            # wrong credentials from a missing permission.
            if "ACCESS_DENIED" in str(error) and "HeadObject" in str(error):
                check_bucket(path)
            raise
        if found.type == pafs.FileType.NotFound:
            check_bucket(path)
        return found


def check_bucket(path: ObjectPath) -> None:
    """Raise DataError unless the bucket exists and these credentials may list it."""
    with translated(path):
        s3().get_file_info(pafs.FileSelector(path.bucket, recursive=False, allow_not_found=False))


def list_objects(prefix: ObjectPath) -> list[ObjectPath]:
    """Every object below ``prefix`` (recursive), sorted by key; directories left out."""
    with translated(prefix):
        found = s3().get_file_info(pafs.FileSelector(prefix.key_path, recursive=True))
    return sorted(ObjectPath(f.path) for f in found if f.type == pafs.FileType.File)


def glob_objects(pattern: ObjectPath) -> list[ObjectPath]:
    """Objects whose ``bucket/key`` match ``pattern`` (``*``, ``?``, ``[..]`` within one
    level, ``**`` across levels), listed below the pattern's fixed leading prefix."""
    parts = pattern.parts
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = ObjectPath(*parts[:fixed])
    if fixed == 0:
        raise DataError("a pattern cannot stand for the bucket", path=pattern)
    regex = re.compile(_translate(pattern.key_path))
    with translated(pattern):
        found = s3().get_file_info(
            pafs.FileSelector(base.key_path, recursive=True, allow_not_found=True)
        )
        if not found:
            check_bucket(base)
    return sorted(
        ObjectPath(f.path)
        for f in found
        if f.type == pafs.FileType.File and regex.fullmatch(f.path)
    )


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _translate(pattern: str) -> str:
    """A glob over ``/``-separated keys as a regular expression (``**`` crosses levels)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def read_bytes(path: ObjectPath) -> bytes:
    """The object's bytes (FileNotFoundError when it does not exist)."""
    try:
        with s3().open_input_stream(path.key_path) as handle:
            return bytes(handle.read())
    except (OSError, pa.ArrowException) as error:
        if is_not_found(error) and "NO_SUCH_BUCKET" not in str(error):
            raise FileNotFoundError(str(path)) from None
        raise object_error(error, path, "cannot read") from None


def write_bytes(path: ObjectPath, data: bytes) -> ObjectPath:
    """Replace the object with ``data`` in one PUT: readers see the old object or the new
    one, never a part (S3 makes an object visible only once its upload completes)."""
    with translated(path, "cannot write"):
        with s3().open_output_stream(path.key_path) as handle:
            handle.write(data)
    return path


def upload(local: Path, path: ObjectPath) -> ObjectPath:
    """Copy the finished local file ``local`` to the object ``path`` (visible once complete)."""
    with translated(path, "cannot write"):
        with local.open("rb") as source, s3().open_output_stream(path.key_path) as target:
            target.upload(source)
    return path


def exists(path: ObjectPath) -> bool:
    return info(path).type == pafs.FileType.File


def delete_file(path: ObjectPath) -> None:
    """Remove one object. One already gone is no error: S3's DELETE is idempotent, and two
    writers pruning one store may both remove the same run (there is no lock on S3)."""
    with translated(path, "cannot delete"):
        try:
            s3().delete_file(path.key_path)
        except FileNotFoundError:
            return


def delete_prefix(prefix: ObjectPath) -> None:
    """Remove every object below ``prefix`` (none left is no error, as for one object)."""
    with translated(prefix, "cannot delete"):
        try:
            s3().delete_dir(prefix.key_path)
        except FileNotFoundError:
            return


@contextmanager
def open_input(path: PurePath) -> Iterator[Any]:
    """A binary handle on ``path`` (local file, or object streamed from S3) for reading."""
    if not isinstance(path, ObjectPath):
        with Path(path).open("rb") as handle:
            yield handle
        return
    with translated(path, "cannot read"), s3().open_input_stream(path.key_path) as handle:
        yield handle
