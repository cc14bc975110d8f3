"""The SuperLink's state: SQLite in the workspace by default, in memory when asked."""

from __future__ import annotations

from pathlib import Path

from medfed.transport.deploy import IN_MEMORY_DATABASE, superlink_command
from medfed.transport.provision import provision_workspace
from medfed.workspace import load_workspace


def _database(argv: list[str]) -> str:
    return argv[argv.index("--database") + 1]


def test_the_state_is_the_workspace_database_unless_memory_is_asked(tmp_path: Path) -> None:
    provision_workspace(out=tmp_path / "ws", sites=["site-a"], host="127.0.0.1")
    workspace = load_workspace(tmp_path / "ws")

    assert _database(superlink_command(workspace=workspace)) == str(workspace.layout.superlink_db)
    memory = superlink_command(workspace=workspace, state="memory")
    assert _database(memory) == IN_MEMORY_DATABASE
    assert memory.count("--database") == 1 and "--enable-supernode-auth" in memory


def test_the_in_memory_name_is_flowers() -> None:
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    assert IN_MEMORY_DATABASE == FLWR_IN_MEMORY_DB_NAME
