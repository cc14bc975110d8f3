"""Fixtures of the audit tests: one real federation record, copied fresh for every test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from audit_support import Federation, build_federation


@pytest.fixture(scope="session")
def federation_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit") / "fed"
    build_federation(root)
    return root


@pytest.fixture
def federation(federation_template: Path, tmp_path: Path) -> Federation:
    root = tmp_path / "fed"
    shutil.copytree(federation_template, root, symlinks=True)
    return Federation(root=root)
