"""Put bytes in a store as a finished download would (temp file, then commit)."""

from __future__ import annotations

import hashlib

from mirror.diskstore import DiskStore
from mirror.reference import Digest


async def commit_bytes(store: DiskStore, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    temp = store.temp_path()
    temp.write_bytes(data)
    await store.commit_blob(digest, temp, len(data))
    return digest
