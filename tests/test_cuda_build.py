"""The CUDA sources without a GPU: every translation unit compiles for sm_80 and sm_90, and the one strategy table
(cuda/strategies.h) agrees with what reads it (the Python names, the kernel headers, docs/cuda_design.md).

The compile tests need nvcc (CUDA_HOME/bin or PATH) and skip cleanly without it; the .cu files include no torch
header, so a CPU-only torch is enough. Each takes about a minute, hence `slow`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hf_fff.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "cuda"
DOC = ROOT / "docs" / "cuda_design.md"
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_flags() -> list[str]:
    """The flags the JIT build passes for .cu files: torch's common nvcc flags, then the backend's own."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [*COMMON_NVCC_FLAGS, "-std=c++17", *cuda_backend.CUDA_CFLAGS]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", cuda_backend.CUDA_UNITS)
def test_cuda_unit_compiles(unit, arch, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    command = [nvcc, *nvcc_flags(), f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CUDA_DIR}", "-c",
               str(CUDA_DIR / unit), "-o", str(tmp_path / f"{Path(unit).stem}.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{unit} for sm_{arch}:\n{result.stderr[-4000:]}"
    assert (tmp_path / f"{Path(unit).stem}.o").stat().st_size > 0


def test_every_cuda_unit_is_built():
    """The build's source list names every .cu of cuda/ (a unit left out would be compiled by nobody), and every
    header of cuda/ is in one backend's HEADERS (the build cache key), the CUDA backend's or the CPU backend's."""
    from hf_fff.backends import cpu as cpu_backend

    assert sorted(cuda_backend.CUDA_UNITS) == sorted(p.name for p in CUDA_DIR.glob("*.cu"))
    headers = sorted(p.name for p in CUDA_DIR.iterdir() if p.suffix in (".h", ".cuh"))
    assert sorted(cuda_backend.HEADERS + cpu_backend.HEADERS) == headers
    assert not set(cuda_backend.HEADERS) & set(cpu_backend.HEADERS)


def test_strategy_table_is_well_formed():
    table = cuda_backend.strategy_table()
    names = [row.name for row in table]
    ids = [row.id for row in table]
    assert len(set(names)) == len(names) and len(set(ids)) == len(ids), table
    assert 0 not in ids and "auto" not in names  # 0 / auto is the automatic choice, not a row
    assert all(row.purpose for row in table)
    assert cuda_backend.strategies() == {"auto": 0, **dict(zip(names, ids))}


def test_every_strategy_is_implemented():
    """Each row's enumerator has its StrategyImpl specialisation in a kernel header."""
    text = (CUDA_DIR / "strategies.h").read_text()
    enumerators = re.findall(r"^\s*X\(\s*(k\w+)\s*,", text, re.M)
    assert len(enumerators) == len(cuda_backend.strategy_table())
    headers = "".join(p.read_text() for p in CUDA_DIR.glob("*.cuh"))
    for enumerator in enumerators:
        assert f"struct StrategyImpl<{enumerator}>" in headers, enumerator


def test_docs_table_matches_the_strategy_table():
    """docs/cuda_design.md's strategy table lists exactly the rows of cuda/strategies.h, in order."""
    text = DOC.read_text()
    start = text.index("checked against cuda/strategies.h")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] in ("name",) or set(cells[0]) <= set("-:"):
            continue
        rows.append((cells[0], int(cells[1]), cells[2]))
    assert rows == [(row.name, row.id, row.purpose) for row in cuda_backend.strategy_table()]
