"""Where datasets live: a local folder or s3://bucket/prefix, opened through pyarrow.fs.

S3 settings come from the standard AWS variables, so the same environment serves boto3, pyarrow
and MLflow. Storage failures become one-line UserErrors that name the endpoint and bucket, never
a secret.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pyarrow.fs as pafs

from segsearch.errors import ServiceUnavailable, UserError, first_line

_CONNECT = ("NETWORK_CONNECTION", "Could not connect", "curlCode", "Couldn't resolve")
_DENIED = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "EXPIRED_TOKEN",
    "ExpiredToken",
)
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")
_NO_KEY = ("NO_SUCH_KEY", "NoSuchKey")
#: What pyarrow's S3 errors say; an OSError without it (and without an errno) is about the bytes.
_S3_ERROR = "AWS Error"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path or an s3:// URI."""
    if is_s3(uri):
        _bucket_and_key(uri)
        return _s3_filesystem(), uri[len("s3://") :].rstrip("/")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        uri = parsed.path
    elif parsed.scheme:
        raise UserError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(path: str, *parts: str) -> str:
    """Join filesystem paths with '/', the separator pyarrow uses for every filesystem."""
    return posixpath.join(path, *parts)


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """A filesystem path as the user writes it: s3://bucket/key on S3, the path itself locally."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def endpoint() -> str:
    """The S3 endpoint requests go to, for messages: AWS_ENDPOINT_URL(_S3) or AWS's own."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url:
        return url
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return f"https://s3.{region}.amazonaws.com"


@contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn storage OSErrors inside the block into a UserError naming the URI and endpoint."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        raise storage_error(uri, err) from None


def storage_error(uri: str, err: OSError) -> UserError:
    """A one-line UserError for a failed storage call on `uri` (secrets scrubbed);
    ServiceUnavailable when the endpoint did not answer."""
    text = _scrub(str(err))
    if not is_s3(uri):
        return UserError(f"cannot access {uri}: {err.strerror or text}")
    bucket, _ = _bucket_and_key(uri)
    where = f"S3 endpoint {endpoint()} (bucket {bucket!r})"
    if any(marker in text for marker in _CONNECT):
        return ServiceUnavailable(
            f"cannot reach {where}: connection failed; check AWS_ENDPOINT_URL"
        )
    if any(marker in text for marker in _DENIED):
        return UserError(
            f"{where} refused the credentials (access denied); check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"
        )
    if any(marker in text for marker in _NO_BUCKET):
        return UserError(f"bucket {bucket!r} does not exist at {where}")
    return UserError(f"{where}: {_scrub(first_line(err))}")


def is_unreachable(err: OSError) -> bool:
    """The store did not answer (down, restarting, network): worth trying again shortly."""
    return any(marker in str(err) for marker in _CONNECT)


def is_missing(err: OSError) -> bool:
    """The file or object is not there (a local FileNotFoundError or S3's NoSuchKey)."""
    return isinstance(err, FileNotFoundError) or any(marker in str(err) for marker in _NO_KEY)


def is_store_failure(err: OSError) -> bool:
    """The store failed (an OS error or an S3 error), rather than the file's bytes being bad:
    pyarrow raises OSError for both, e.g. "Couldn't deserialize thrift" for damaged Parquet."""
    return err.errno is not None or _S3_ERROR in str(err) or is_unreachable(err)


def check_bucket(uri: str, fs: pafs.FileSystem) -> None:
    """Fail early, with a clear message, when an s3:// URI's bucket is unreachable or missing."""
    if not is_s3(uri):
        return
    bucket, _ = _bucket_and_key(uri)
    with storage_errors(uri):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"bucket {bucket!r} does not exist at S3 endpoint {endpoint()}")


def _bucket_and_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if len(bucket) < 3:
        raise UserError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix (bucket of 3+ chars)")
    return bucket, key.rstrip("/")


def _s3_filesystem() -> pafs.S3FileSystem:
    options: dict[str, object] = {
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    }
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        if parsed.scheme not in ("http", "https"):
            raise UserError(f"AWS_ENDPOINT_URL={url!r}: the scheme must be http or https")
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme
    if not (options["access_key"] and options["secret_key"]):
        options.pop("access_key")
        options.pop("secret_key")
        options.pop("session_token")
    return pafs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})


def _scrub(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return text
