"""`hf-fff env`: what this machine offers hf_fff: versions, compilers, the kernel cache, and which FFF backend each device uses."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch
import transformers

from .. import __version__, backends, extension


def tool_version(command: str, naming: str = "") -> Optional[str]:
    """The first line of `command --version` that contains `naming` (else its first line); None when it does not run."""
    try:
        result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return next((line for line in lines if naming in line), lines[0] if lines else None)


def cxx_compiler_row() -> str:
    command = extension.cxx_compiler()
    path = shutil.which(command)
    if path is None:
        return f"not found (looked for {command!r}; set CXX; the CPU kernel falls back to plain torch)"
    return f"{path}: {tool_version(path) or 'version unknown'}"


def nvcc_row() -> str:
    """nvcc as builds see it (CUDA_HOME); else one on PATH, which a torch without CUDA does not use."""
    nvcc: Optional[Path] = extension.nvcc_path()
    if nvcc is None and shutil.which("nvcc"):
        nvcc = Path(shutil.which("nvcc"))
    if nvcc is None:
        return "not found (set CUDA_HOME to a CUDA toolkit to build the CUDA kernel)"
    version = tool_version(str(nvcc), naming="release") or "version unknown"
    unused = "; unused: this torch has no CUDA" if torch.version.cuda is None else ""
    return f"{nvcc}: {version}{unused}"


def describe() -> list[tuple[str, str]]:
    rows = [
        ("hf_fff", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("C++ compiler", cxx_compiler_row()),
        ("nvcc", nvcc_row()),
        ("kernel cache", str(extension.cache_root())),
        ("cuda device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("cpu threads", str(torch.get_num_threads())),
        ("requested backend", backends.requested_backend()),
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name, _ = backends.resolve(device)  # builds the native extension on first use
        rows.append((f"FFF backend on {device}", name))
    return rows
