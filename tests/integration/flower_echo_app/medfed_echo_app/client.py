"""ClientApp of the echo test app."""

from __future__ import annotations

import os
import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's node_config and where the ClientApp process runs."""
    echo = ConfigRecord(
        {
            **{f"node_config.{k}": v for k, v in context.node_config.items()},
            "greeting": str(msg.content["ask"]["greeting"]),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
            "executable": sys.executable,
            "path0": os.environ.get("PATH", "").split(os.pathsep)[0],
            "path1": [*os.environ.get("PATH", "").split(os.pathsep), ""][1],
            "flwr_home": os.environ.get("FLWR_HOME", ""),
            "telemetry": os.environ.get("FLWR_TELEMETRY_ENABLED", ""),
            "argv": " ".join(sys.argv),
        }
    )
    return Message(RecordDict({"echo": echo}), reply_to=msg)
