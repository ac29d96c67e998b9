"""Put bytes in a Storage as a finished download would (temp file, then commit)."""

from __future__ import annotations

import hashlib

from mirror.reference import Digest
from mirror.storage import Storage


def commit_bytes(storage: Storage, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    temp = storage.temp_path()
    temp.write_bytes(data)
    storage.commit_blob(digest, temp, len(data))
    return digest
