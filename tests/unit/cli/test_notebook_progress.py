"""In a notebook the sites' table is one output, updated in place, and its clocks move while a
round runs: checked in a real Jupyter kernel, over the messages a notebook front end gets."""

from __future__ import annotations

import queue
import textwrap
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

CELL = textwrap.dedent(
    """
    import time
    from medfed.api.progress import progress_callback, NotebookProgress
    from medfed.run_events import RoundStarted, RunFinished, RunStarted
    assert isinstance(progress_callback(True), NotebookProgress)  # chosen in a kernel
    show = NotebookProgress(tick_s=0.25)
    now = time.time()
    show(RunStarted(run_name="nb", time=now, rounds=2, sites=("site-a", "site-b")))
    show(RoundStarted(run_name="nb", time=now, round=1, sites=("site-a", "site-b")))
    time.sleep(2.6)
    show(RunFinished(run_name="nb", reason="all rounds done", summary={"sites": []}))
    time.sleep(0.6)
    """
)


@pytest.mark.slow
def test_the_notebook_table_is_redrawn_in_place_while_a_round_runs() -> None:
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        msg_id = client.execute(CELL)
        shown: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        while True:
            try:
                message = client.get_iopub_msg(timeout=60)
            except queue.Empty:
                pytest.fail("the kernel went quiet")
            kind, content = message["msg_type"], message["content"]
            if kind == "error":
                pytest.fail("\n".join(content["traceback"]))
            if kind == "display_data":
                shown.append(content)
            elif kind == "update_display_data":
                updates.append(content)
            elif (
                kind == "status"
                and content["execution_state"] == "idle"
                and message["parent_header"].get("msg_id") == msg_id
            ):
                break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert len(shown) == 1  # one output area, then only updates of it
    display_id = shown[0]["transient"]["display_id"]
    assert all(u["transient"]["display_id"] == display_id for u in updates)
    texts = [u["data"]["text/plain"] for u in updates]
    # Only two events arrive during the round; the clock moves on between them all the same.
    assert any("run nb: round 1 of 2, 2 s" in text for text in texts), texts
    assert "site-a: training, 2 s" in "\n".join(texts)
    assert "<td>training</td>" in updates[-2]["data"]["text/html"]
    assert texts[-1].startswith("run nb: finished: all rounds done")
    # Once the run ended nothing is redrawn any more.
    assert not any("finished" in text for text in texts[:-1])
