"""The researcher notebooks run from top to bottom, with small parameters, in a real kernel.

Parameters are overridden as papermill does: a cell inserted after the one tagged
``parameters``. Every notebook writes only under this test's temporary directory (``TMPDIR``
of its kernel), and nothing it started may outlive it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
RESULT_MARK = "MEDFED-TEST-RESULT "
# Small enough for CI's two cores; big enough that the models learn something.
SMALL: Mapping[str, Mapping[str, Any]] = {
    "01_quickstart": {"cases": 8, "size": 16, "rounds": 2, "local_epochs": 1},
    "02_privacy_utility": {
        "cases": 20,
        "size": 16,
        "rounds": 12,
        "epsilons": [2.0, 8.0],
        "central_epochs": 12,
        "nonprivate_rounds": 3,
        "nonprivate_local_epochs": 4,
        "track": False,
    },
    "03_audit": {},
    # Two sites: each message starts a fresh ClientApp process per site (seconds of imports),
    # and two of them share CI's two cores without waiting for each other.
    "04_deployment": {"sites": 2, "cases": 8, "size": 16, "rounds": 1, "local_epochs": 1},
}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _with_parameters(
    notebook: nbformat.NotebookNode, parameters: Mapping[str, Any], result: str | None
) -> nbformat.NotebookNode:
    index = next(
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)
    if result is not None:
        notebook.cells.append(
            nbformat.v4.new_code_cell(f"import json\nprint({RESULT_MARK!r} + json.dumps({result}))")
        )
    return notebook


def _text(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
    return "".join(parts)


def _own_processes(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the test's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in command:
            found.append(int(entry.name))
    return found


def execute(
    name: str,
    *,
    directory: Path,
    parameters: Mapping[str, Any] | None = None,
    result: str | None = None,
) -> tuple[nbformat.NotebookNode, float, Any]:
    """Run notebook ``name``; the executed notebook, its seconds and the ``result`` value."""
    directory.mkdir(parents=True, exist_ok=True)
    notebook = _with_parameters(_read(name), {**SMALL[name], **(parameters or {})}, result)
    client = NotebookClient(
        notebook,
        timeout=400,
        kernel_name="python3",
        resources={"metadata": {"path": str(directory)}},
    )
    env = {**os.environ, "TMPDIR": str(directory)}
    for variable in ("MLFLOW_TRACKING_URI", "MPLBACKEND"):  # the notebooks' defaults, not ours
        env.pop(variable, None)
    started = time.monotonic()
    try:
        client.execute(env=env)
    finally:
        seconds = time.monotonic() - started
        print(f"{name}: {seconds:.1f} s")
        leftovers = _own_processes(str(directory))
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"{name} left processes running: {leftovers}"
    value = None
    if result is not None:
        line = next(x for x in _text(notebook).splitlines() if x.startswith(RESULT_MARK))
        value = json.loads(line.removeprefix(RESULT_MARK))
    return notebook, seconds, value


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("quickstart")
    _, _, value = execute(
        "01_quickstart",
        directory=directory,
        result="{'workspace': str(results.workspace), 'status': results.status, "
        "'run_id': results.mlflow_run_id, 'rows': len(results.history)}",
    )
    yield value


@pytest.mark.slow
def test_quickstart_runs_a_tracked_dp_federation(quickstart: dict[str, Any]) -> None:
    assert quickstart["status"] == "finished"
    assert quickstart["run_id"]
    assert quickstart["rows"] == 3 * SMALL["01_quickstart"]["rounds"]


@pytest.mark.slow
def test_audit_verifies_the_quickstart_run(quickstart: dict[str, Any], tmp_path: Path) -> None:
    _, _, value = execute(
        "03_audit",
        directory=tmp_path,
        parameters={"workspace": quickstart["workspace"], "run_name": "quickstart"},
        result="{'verdict': report.verification.verdict, 'sites': len(report.sites)}",
    )
    assert value == {"verdict": "PASS", "sites": 3}


@pytest.mark.slow
def test_privacy_utility_reports_the_dice_ratio_at_epsilon_8(tmp_path: Path) -> None:
    _, _, value = execute(
        "02_privacy_utility",
        directory=tmp_path,
        result="{'ratios': ratios.to_dict(), 'table': table.reset_index().to_dict('records')}",
    )
    print("Dice ratio at epsilon 8:", value["ratios"])
    assert set(value["ratios"]) == {"site-a", "site-b", "site-c", "all sites"}
    for setting in value["table"]:
        assert 0.0 <= setting["Dice"] <= 1.0, setting
    spent = [s["epsilon"] for s in value["table"] if s["setting"].startswith("federated, epsilon")]
    assert spent == sorted(spent) and max(spent) <= 8.0


@pytest.mark.slow
def test_deployment_submits_to_its_own_aggregator_and_stops_it(tmp_path: Path) -> None:
    _, _, value = execute(
        "04_deployment",
        directory=tmp_path,
        result="{'status': results.status, 'rows': len(results.history), "
        "'run_id': results.mlflow_run_id}",
    )
    assert value["status"] == "finished"
    assert value["rows"] == SMALL["04_deployment"]["sites"] * SMALL["04_deployment"]["rounds"]
    assert value["run_id"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_is_committed_without_outputs_and_has_parameters(name: str) -> None:
    notebook = _read(name)
    nbformat.validate(notebook)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # every small parameter overrides one the notebook defines
    defined = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
    assert set(SMALL[name]) <= defined
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, name
