"""ServerApp of the echo test app."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Wait for ``min-nodes`` nodes, send each one query, write the replies as JSON."""
    min_nodes = int(context.run_config["min-nodes"])
    deadline = time.monotonic() + float(context.run_config["wait-s"])
    nodes = list(grid.get_nodes())
    while len(nodes) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_nodes())
    ask = {
        "greeting": str(context.run_config["greeting"]),
        "sleep_s": float(context.run_config["sleep-s"]),
    }
    content = RecordDict({"ask": ConfigRecord(ask)})
    messages = [
        Message(content=content, dst_node_id=node.node_id, message_type="query") for node in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=float(context.run_config["reply-timeout-s"]))
    result = {
        "node_ids_online": sorted(int(n) for n in grid.get_node_ids()),
        "nodes": [{"node_id": int(n.node_id), "name": n.name} for n in nodes],
        "replies": [
            {
                "src_node_id": int(reply.metadata.src_node_id),
                "error": reply.error.reason if reply.has_error() else None,
                "content": (dict(reply.content["echo"]) if reply.has_content() else None),
            }
            for reply in replies
        ],
        "run_config": dict(context.run_config),
        "env": {key: os.environ.get(key) for key in ("MEDFED_WORKSPACE", "MEDFED_ECHO_OUT")},
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "argv": " ".join(sys.argv),
        "flwr_home": os.environ.get("FLWR_HOME"),
    }
    out = os.environ.get("MEDFED_ECHO_OUT")
    if out:
        Path(out).write_text(json.dumps(result, indent=1), encoding="utf-8")
