"""ClientApp of the echo test app."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's node_config and where the ClientApp process runs."""
    # what a forked warm worker shares with its children: imported modules only
    torch_loaded = "torch" in sys.modules
    time.sleep(float(msg.content["ask"]["sleep_s"]))
    site_file = Path(str(context.node_config["site-config"]))
    site = yaml.safe_load(site_file.read_text(encoding="utf-8"))
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
            "torch_loaded": torch_loaded,
            "site_epochs": int(site.get("training", {}).get("epochs", 0)),
        }
    )
    return Message(RecordDict({"echo": echo}), reply_to=msg)
