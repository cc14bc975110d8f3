"""The warm worker's socket directory for a long path is temporary, removed when it stops, and
the same one for the same workdir, so that a node killed outright leaves at most one behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

from medfed.site import warm_worker
from medfed.site.warm_client import TEMP_DIR_PREFIX
from medfed.transport.deploy import warm_socket_path


def test_a_long_workdir_gets_a_temporary_socket_directory_that_is_removed(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = warm_socket_path(deep)
    directory = path.parent
    assert directory.name.startswith(TEMP_DIR_PREFIX)
    assert directory.parent == Path(tempfile.gettempdir())
    assert directory.stat().st_mode & 0o777 == 0o700
    warm_worker._remove_temp_dir(directory)
    assert not directory.exists()


def test_only_an_empty_temporary_directory_of_the_worker_is_removed(tmp_path: Path) -> None:
    short = warm_socket_path(tmp_path)
    assert short.parent == tmp_path / "warm"
    warm_worker._remove_temp_dir(short.parent)  # the site's own directory stays
    assert short.parent.is_dir()
    held = Path(tempfile.mkdtemp(prefix=TEMP_DIR_PREFIX))
    (held / "other").write_text("x")
    warm_worker._remove_temp_dir(held)  # not empty: kept
    assert held.is_dir()
    (held / "other").unlink()
    held.rmdir()


def test_a_killed_nodes_directory_is_taken_over_and_a_foreign_one_never_used(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    first = warm_socket_path(deep)
    first.touch()  # a node killed outright left its socket behind
    again = warm_socket_path(deep)
    assert again == first  # its next start takes the directory over
    other = warm_socket_path(tmp_path / ("f" * 60) / ("g" * 60))
    assert other.parent != first.parent
    first.unlink()
    first.parent.chmod(0o755)  # not private any more: not used
    fresh = warm_socket_path(deep)
    assert fresh.parent != first.parent and fresh.parent.stat().st_mode & 0o777 == 0o700
    for directory in (first.parent, other.parent, fresh.parent):
        directory.rmdir()
