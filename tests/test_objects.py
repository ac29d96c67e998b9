"""The bucket client (mirror.objects) against a real Ceph RGW: only completed uploads
are visible, aborted ones leave nothing, and a bucket that is down fails fast."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from pathlib import Path

import obstore
import pytest
from harness.rgw import RadosGateway
from obstore.store import S3Store

from mirror.metrics import Metrics
from mirror.objects import Objects, ObjectStoreError
from mirror.reference import Digest

MiB = 1 << 20


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _objects(rgw: RadosGateway, bucket: str, metrics: Metrics, endpoint: str = "") -> Objects:
    return Objects.connect(
        bucket=bucket,
        prefix="pfx/",
        endpoint=endpoint or rgw.endpoint,
        region="us-east-1",
        path_style=True,
        ca_bundle=None,
        access_key_id=rgw.credentials.access_key,
        secret_access_key=rgw.credentials.secret_key,
        connect_timeout=2,
        read_timeout=5,
        metrics=metrics,
    )


@pytest.fixture
def bucket(rgw: RadosGateway) -> str:
    name = f"u{uuid.uuid4().hex[:12]}"
    rgw.create_bucket(name)
    return name


def _keys(rgw: RadosGateway, bucket: str) -> list[str]:
    """The whole bucket's keys, seen without the mirror's prefix."""
    store = S3Store(
        bucket,
        endpoint=rgw.endpoint,
        access_key_id=rgw.credentials.access_key,
        secret_access_key=rgw.credentials.secret_key,
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    return [m["path"] for batch in obstore.list(store) for m in batch]


async def test_an_upload_follows_the_file_and_completes_only_when_told(
    rgw: RadosGateway, bucket: str, tmp_path: Path
) -> None:
    metrics = Metrics()
    objects = _objects(rgw, bucket, metrics)
    data = os.urandom(40 * MiB)  # three parts of 16 MiB
    digest = _digest(data)
    path = tmp_path / "temp"
    path.touch()
    upload = objects.upload(digest, path)
    upload.start()
    with path.open("r+b") as f:
        for start in range(0, len(data), 4 * MiB):
            f.write(data[start : start + 4 * MiB])
            f.flush()
            upload.wrote(min(start + 4 * MiB, len(data)))
            await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    assert _keys(rgw, bucket) == []  # every byte sent, nothing visible yet
    assert await upload.complete(len(data))
    assert _keys(rgw, bucket) == [f"pfx/blobs/sha256/{digest.hex}"]
    assert await objects.blob_size(digest) == len(data)
    body = await objects.open_blob(digest, 10, 20 * MiB)
    assert body is not None
    got = b"".join([chunk async for chunk in body])
    assert got == data[10 : 20 * MiB]
    assert metrics.s3_requests.labels("upload", "ok")._value.get() == 1


async def test_an_aborted_upload_leaves_nothing(
    rgw: RadosGateway, bucket: str, tmp_path: Path
) -> None:
    objects = _objects(rgw, bucket, Metrics())
    data = os.urandom(20 * MiB)
    path = tmp_path / "temp"
    path.write_bytes(data)
    upload = objects.upload(_digest(data), path)
    upload.start()
    upload.wrote(len(data))
    await asyncio.sleep(0.5)  # a part is on its way
    await upload.abort()
    assert not await upload.complete(len(data))
    assert _keys(rgw, bucket) == []


async def test_manifests_keep_their_media_type_and_are_checked_on_read(
    rgw: RadosGateway, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    objects = _objects(rgw, bucket, Metrics())
    body = b'{"schemaVersion":2}'
    digest = _digest(body)
    media_type = "application/vnd.oci.image.manifest.v1+json"
    await objects.put_manifest(digest, media_type, body)
    assert await objects.get_manifest(digest) == (media_type, body)
    assert await objects.get_manifest(_digest(b"other")) is None
    # Bytes under the wrong name are never handed out.
    wrong = _digest(b"wrong")
    await obstore.put_async(objects._store, objects.manifest_key(wrong), body)
    with caplog.at_level(logging.ERROR):
        assert await objects.get_manifest(wrong) is None
    assert "does not match its digest" in caplog.text


async def test_a_bucket_that_is_down_fails_fast_and_logs_once(
    rgw: RadosGateway, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    metrics.add_shared_store()
    # Nothing listens on the discard port.
    objects = _objects(rgw, bucket, metrics, endpoint="http://127.0.0.1:9")
    with caplog.at_level(logging.ERROR):
        with pytest.raises(ObjectStoreError):
            await objects.blob_size(_digest(b"x"))
        assert not objects.reachable
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(20):
            with pytest.raises(ObjectStoreError, match="unavailable"):
                await objects.blob_size(_digest(b"x"))
        assert loop.time() - started < 0.5  # backing off: no request made
    assert caplog.text.count("object store unavailable") == 1
    assert metrics.shared_degraded.labels("s3")._value.get() == 1
    assert rgw.credentials.secret_key not in caplog.text
