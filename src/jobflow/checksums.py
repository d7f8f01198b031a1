"""SHA-256 digests in the two spellings jobflow meets.

jobflow records a digest as 64 lowercase hex characters; S3 (and the
``x-amz-checksum-sha256`` header every upload target uses) carries it as the
base64 of the 32 raw bytes.
"""

from __future__ import annotations

import base64
import binascii

from jobflow.errors import InvalidInput

SHA256_HEADER = "x-amz-checksum-sha256"


def sha256_hex_to_base64(sha256: str) -> str:
    """The base64 form of a hex SHA-256; :class:`InvalidInput` if it is not one."""
    try:
        digest = bytes.fromhex(sha256)
    except (TypeError, ValueError):
        digest = b""
    if len(digest) != 32:
        raise InvalidInput("sha256 must be 64 hexadecimal characters")
    return base64.b64encode(digest).decode("ascii")


def sha256_base64_to_hex(value: str) -> str | None:
    """The hex form of a base64 SHA-256, or None if ``value`` is not a whole digest.

    S3 reports a multipart upload's composite checksum as ``<base64>-<parts>``:
    a checksum of the parts' checksums, which no client-side digest can
    match, so it reads as None too.
    """
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None
