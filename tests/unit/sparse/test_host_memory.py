"""The default host budget honours the memory cgroup, on planted cgroup trees."""

from pathlib import Path

from sgl_kvtier.sparse.host_memory import cgroup_memory_limit, physical_memory, usable_memory


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_limit_on_a_parent_binds_the_child(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("5:devices:/\n4:memory:/svc/job\n0::/\n")
    _write(tmp_path / "memory/svc/job/memory.limit_in_bytes", "9223372036854771712\n")
    _write(tmp_path / "memory/svc/memory.limit_in_bytes", str(3 << 30))
    _write(tmp_path / "memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_memory_limit(tmp_path, membership) == 3 << 30


def test_v2_takes_the_smallest_limit_and_reads_max_as_none(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/a/b\n")
    _write(tmp_path / "a/b/memory.max", "max\n")
    _write(tmp_path / "a/memory.max", str(5 << 30))
    _write(tmp_path / "memory.max", str(7 << 30))
    assert cgroup_memory_limit(tmp_path, membership) == 5 << 30
    _write(tmp_path / "a/memory.max", "max\n")
    _write(tmp_path / "memory.max", "max\n")
    assert cgroup_memory_limit(tmp_path, membership) is None


def test_hybrid_hosts_read_v2_under_unified(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/x\n")
    _write(tmp_path / "unified/x/memory.max", str(2 << 30))
    assert cgroup_memory_limit(tmp_path, membership) == 2 << 30


def test_a_group_path_never_reads_outside_the_mount(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    _write(tmp_path / "memory.max", str(1 << 30))  # outside the mount: must not be read
    membership = tmp_path / "cgroup"
    membership.write_text("0::/../\n")
    assert cgroup_memory_limit(mount, membership) is None


def test_unreadable_membership_means_no_limit(tmp_path):
    assert cgroup_memory_limit(tmp_path, tmp_path / "missing") is None


def test_usable_memory_is_at_most_the_machine():
    assert 0 < usable_memory() <= physical_memory()
