"""Where inputs and outputs live, and reading and writing them there: a local path, or a URI
(`s3://bucket/prefix`) on an object store. One API over both, in three modules:

- `paths`: locations (`location(text)` gives a `Path` or an `ObjectPath`), listings, globs;
- `files`: reading, hashing and the three writes that differ on an object store (`Sink`,
  `put_atomic`, `create_exclusive`);
- `s3`: the S3 requests pyarrow cannot make (conditional writes, multipart uploads, ETags);
- `errors`: what a store reports, as one line for the user.

S3 writes go through boto3; reads and listings through pyarrow. Both take credentials, region
and `AWS_ENDPOINT_URL` from the standard AWS environment variables and config files.
"""

from lib.storage.errors import StorageError, explain, storage_error
from lib.storage.files import (
    Sink,
    create_exclusive,
    dataset_files,
    fsync_dir,
    fsync_file,
    matches,
    open_input,
    open_mapped,
    open_stream,
    put_atomic,
    remove,
    sha256,
    touch,
)
from lib.storage.paths import (
    AnyPath,
    ObjectPath,
    Stat,
    etag,
    filesystem,
    glob_regex,
    is_remote,
    is_s3,
    is_uri,
    listing,
    location,
)

__all__ = [
    "AnyPath",
    "ObjectPath",
    "Sink",
    "Stat",
    "StorageError",
    "create_exclusive",
    "dataset_files",
    "etag",
    "explain",
    "filesystem",
    "fsync_dir",
    "fsync_file",
    "glob_regex",
    "is_remote",
    "is_s3",
    "is_uri",
    "listing",
    "location",
    "matches",
    "open_input",
    "open_mapped",
    "open_stream",
    "put_atomic",
    "remove",
    "sha256",
    "storage_error",
    "touch",
]
