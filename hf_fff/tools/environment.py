"""`hf-fff env`: what this machine offers hf_fff: devices, versions, and which FFF backend each device uses."""

from __future__ import annotations

import platform

import torch
import transformers

from .. import backends


def describe() -> list[tuple[str, str]]:
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("cuda device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("cpu threads", str(torch.get_num_threads())),
        ("requested backend", backends.requested_backend()),
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name, _ = backends.resolve(device)  # builds the native extension on first use
        rows.append((f"FFF backend on {device}", name))
    return rows
