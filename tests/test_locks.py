"""Leases and recovery between processes sharing a cache directory (two stores on one
directory stand for two processes: flocks belong to open files, not processes)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from mirror import locks
from mirror.diskstore import DiskStore
from mirror.reference import Digest
from mirror.sharing import Follower, Leader, Sharing

DIGEST = Digest("sha256", hashlib.sha256(b"layer").hexdigest())
OTHER = Digest("sha256", hashlib.sha256(b"other layer").hexdigest())


def test_one_leader_per_digest_and_upstream_and_a_fresh_lease_after_it_ends(
    tmp_path: Path,
) -> None:
    first, second = DiskStore(tmp_path), DiskStore(tmp_path)
    leader = Sharing(first, "docker.io").claim(DIGEST, "lib/a")
    follower = Sharing(second, "docker.io").claim(DIGEST, "lib/b")
    assert isinstance(leader, Leader) and isinstance(follower, Follower)
    assert leader.temp.exists() and follower.temp == leader.temp
    # Another upstream's download of the same digest is its own.
    assert isinstance(Sharing(second, "ghcr.io").claim(DIGEST, "lib/a"), Leader)
    leader.temp.write_bytes(b"partial")
    leader.failed(RuntimeError("gone"))
    assert locks.is_free(follower.fd)
    assert b'"event":"failed"' in os.pread(follower.fd, 4096, 0)  # read by followers
    os.close(follower.fd)
    again = Sharing(second, "docker.io").claim(DIGEST, "lib/b")
    assert isinstance(again, Leader)
    assert again.temp.stat().st_size == 0  # its own file, not the partial one


def test_a_dead_leaders_lease_is_replaced_and_its_followers_see_it_free(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    path = store.lease_path(DIGEST, "docker.io")
    fd, held = locks.claim(path)
    assert held
    os.write(fd, b'{"event":"leader"}\n')
    follower_fd, follower_held = locks.claim(path)
    assert not follower_held and not locks.is_free(follower_fd)
    os.close(fd)  # the leader dies: the kernel drops its lock, its file stays
    assert locks.is_free(follower_fd)
    new_fd, new_held = locks.claim(path)
    assert new_held and os.fstat(new_fd).st_size == 0  # a fresh lease, not the dead one's
    assert os.fstat(new_fd).st_ino != os.fstat(follower_fd).st_ino


def test_recovery_beside_a_live_process_keeps_its_downloads(tmp_path: Path) -> None:
    live = DiskStore(tmp_path)
    live.recover()  # alone: holds serving.lock shared from now on
    lead = Sharing(live, "docker.io").claim(DIGEST, "lib/a")
    assert isinstance(lead, Leader)
    lead.temp.write_bytes(b"half a download")
    # What a dead process left: a leased temp file without a live lease, and a lease.
    dead = live.leased_temp(OTHER, "docker.io")
    dead.write_bytes(b"dead")
    stale = live.lease_path(OTHER, "docker.io")
    stale.write_text('{"event":"leader"}\n')
    random_name = live.temp_path()
    random_name.write_bytes(b"maybe a live process's")
    # The blob being committed under the held lease: renamed, not yet indexed.
    committing = live.blob_path(DIGEST)
    committing.parent.mkdir(parents=True, exist_ok=True)
    committing.write_bytes(b"layer")

    restarted = DiskStore(tmp_path)
    report = restarted.recover()
    assert (report.temp_removed, report.orphan_files_removed) == (1, 0)
    assert lead.temp.read_bytes() == b"half a download"
    assert random_name.exists() and committing.exists()
    assert not dead.exists() and not stale.exists()
    # The hourly sweep leaves a held lease's file however old it is.
    old = time.time() - 7200
    os.utime(lead.temp, (old, old))
    os.utime(random_name, (old, old))
    assert restarted.sweep_temp(3600) == 1
    assert lead.temp.exists() and not random_name.exists()
    lead.failed(RuntimeError("done"))
    live.close()
    restarted.close()
    # Alone again: everything not committed goes.
    alone = DiskStore(tmp_path)
    report = alone.recover()
    assert (report.temp_removed, report.orphan_files_removed) == (1, 1)
    assert list(alone.tmp_dir.iterdir()) == []
