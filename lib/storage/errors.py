"""What object stores and pyarrow report, as one-line causes for the user."""

from __future__ import annotations

S3_SCHEMES = ("s3", "s3a")

_NO_CREDENTIALS = (
    "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
)
# What S3 and pyarrow report, and what it means for the user.
_CAUSES = (
    (("NoSuchBucket", "NO_SUCH_BUCKET"), "the bucket does not exist"),
    (
        ("InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "Access Key Id you provided does not"),
        "the access key is not valid (check AWS_ACCESS_KEY_ID or AWS_PROFILE)",
    ),
    (
        ("SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "signature we calculated does not"),
        "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY)",
    ),
    (
        ("AccessDenied", "ACCESS_DENIED", "Forbidden"),
        "access denied (check the credentials, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
        "AWS_PROFILE, and the bucket's permissions)",
    ),
    (("ExpiredToken", "EXPIRED_TOKEN"), "the credentials have expired"),
    (("NoCredentialsError", "Unable to locate credentials"), _NO_CREDENTIALS),
    (
        ("Could not connect", "EndpointConnectionError", "NETWORK_CONNECTION", "Couldn't connect"),
        "cannot reach the endpoint (check AWS_ENDPOINT_URL and the network)",
    ),
)


class StorageError(OSError):
    """An object store refused or failed a request; its text is one line for the user, `code`
    the store's error code (`PreconditionFailed`) where it gave one."""

    def __init__(self, message: str, filename: str | None = None, code: str | None = None):
        super().__init__(message)
        self.filename = filename
        self.code = code

    def __str__(self) -> str:
        return self.args[0]


def _known_cause(exc: BaseException) -> str | None:
    text = f"{type(exc).__name__} {exc}"
    for markers, cause in _CAUSES:
        if any(marker in text for marker in markers):
            return cause
    return None


def explain(exc: BaseException) -> str:
    """An object store's error as a short cause (`the bucket does not exist`)."""
    cause = _known_cause(exc)
    if cause is not None:
        return cause
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _no_credentials() -> bool:
    """Whether the standard AWS chain (variables, config files, instance roles) finds none."""
    try:
        import botocore.session
    except ImportError:
        return False  # cannot tell
    try:
        return botocore.session.get_session().get_credentials() is None
    except Exception:
        return False


def storage_error(exc: BaseException, path: object) -> OSError:
    """`exc` (pyarrow's, botocore's) as a StorageError with a one-line cause naming `path`."""
    if isinstance(exc, FileNotFoundError):
        return exc
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")  # botocore's ClientError
    cause = _known_cause(exc)
    if (
        cause is None
        and str(path).startswith(tuple(f"{s}://" for s in S3_SCHEMES))
        and _no_credentials()
    ):
        # unsigned requests fail in store-specific ways (403, 500) that name no cause
        cause = _NO_CREDENTIALS
    return StorageError(cause or explain(exc), str(path), code)


# -- locations ---------------------------------------------------------------------------------
