from __future__ import annotations

from pathlib import Path

import pytest

from mirror.cpus import available, cgroup_quota, parse_cpu_max


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        pytest.param("max 100000\n", None, id="no-quota"),
        pytest.param("200000 100000\n", 2.0, id="two"),
        pytest.param("150000 100000", 1.5, id="one-and-a-half"),
        pytest.param("50000 100000", 0.5, id="half"),
        pytest.param("", None, id="empty"),
        pytest.param("lots 100000", None, id="junk"),
        pytest.param("100000 0", None, id="zero-period"),
    ],
)
def test_parse_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("mask", "quota", "workers"),
    [
        pytest.param(8, None, 8, id="affinity-only"),
        pytest.param(8, 2.0, 2, id="quota-binds"),
        pytest.param(8, 1.5, 1, id="rounded-down"),
        pytest.param(8, 0.5, 1, id="at-least-one"),
        pytest.param(2, 16.0, 2, id="affinity-binds"),
    ],
)
def test_available(mask: int, quota: float | None, workers: int) -> None:
    assert available(mask, quota) == workers


def _cgroup(tmp_path: Path, limits: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in limits.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cpu.max").write_text(text)
    (root / "kubepods/pod1/ctr").mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    return root, proc


def test_the_tightest_quota_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    # A pod's limit sits on the pod's cgroup, above the container's own (no quota).
    root, proc = _cgroup(
        tmp_path,
        {
            "kubepods": "max 100000",
            "kubepods/pod1": "300000 100000",
            "kubepods/pod1/ctr": "max 100000",
        },
    )
    assert cgroup_quota(root, proc) == 3.0


def test_no_quota_anywhere(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, {"kubepods/pod1/ctr": "max 100000"})
    assert cgroup_quota(root, proc) is None


def test_cgroup_v1_only_has_no_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/x\n1:cpu:/\n")
    assert cgroup_quota(tmp_path, proc) is None
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None
