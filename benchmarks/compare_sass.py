"""Check, without a GPU, that a change to cuda/ leaves the kernels' machine code as it was.

    python benchmarks/compare_sass.py BEFORE [AFTER] [--arch 80 90] [--work DIR]

BEFORE and AFTER are git revisions (AFTER defaults to the working tree). Each revision's CUDA translation units are
compiled with nvcc for each architecture (-c, the flags the JIT build uses), disassembled with cuobjdump -sass, and
every kernel present in both is compared instruction by instruction. Names are compared demangled, without the
per-file anonymous namespace; the kernel parameter block is compared by field: an operand c[0x0][offset] is
rewritten as the Params field (or the extra kernel argument) it reads, with offsets computed from each revision's
own Params, so a field that moved in the struct reads the same. Exits 1 if a kernel in both differs.

Needs nvcc, c++filt, and cuobjdump (+ nvdisasm) on PATH. Revisions whose kernels include
torch's c10 headers (before the CUDA sources became torch-free) are compiled against the installed torch's headers
with a stub for the one generated header a CPU-only torch lacks.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_fff.backends.cuda import CUDA_CFLAGS  # noqa: E402

# torch.utils.cpp_extension adds these to every nvcc command (COMMON_NVCC_FLAGS), so the JIT build has them too.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-std=c++17", "-Xcompiler", "-fPIC",
]
# First byte of the kernel parameters in constant bank 0.
PARAM_BASE = {"80": 0x160, "90": 0x210}
# Kernels renamed on purpose: (pattern, replacement) applied to the old demangled names.
RENAMES = [(re.compile(r"(single_kernel<[^<>]*), false>"), r"\1>")]
# Extra kernel arguments after Params, by their mangled type code: (size, alignment).
ARG_TYPES = {"l": (8, 8), "i": (4, 4), "14CUtensorMap_st": (128, 64)}


def export_cuda(revision: str | None, into: Path) -> Path:
    """cuda/ of a revision (None: the working tree) as files under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    if revision is None:
        for path in (ROOT / "cuda").iterdir():
            if path.is_file():
                (into / path.name).write_bytes(path.read_bytes())
        return into
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "cuda"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                (into / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return into


def torch_include_flags(work: Path) -> list[str]:
    import torch

    stub = work / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [f"-I{Path(torch.__file__).parent / 'include'}", f"-I{work / 'stub'}"]


def compile_sass(source_dir: Path, arch: str, work: Path) -> dict[str, list[str]]:
    """{kernel name: instructions} of every .cu file of source_dir, compiled for sm_<arch>."""
    kernels: dict[str, list[str]] = {}
    needs_torch = any("c10/" in p.read_text() for p in source_dir.iterdir() if p.suffix in (".cuh", ".h", ".cu"))
    extra = torch_include_flags(work) if needs_torch else []
    for unit in sorted(source_dir.glob("*.cu")):
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(source_dir.iterdir()))).hexdigest()[:12]
        obj = work / f"{unit.stem}-sm{arch}-{digest}.o"
        if not obj.exists():
            flags = CUDA_CFLAGS + TORCH_NVCC_FLAGS + extra + [f"-I{source_dir}"]
            arch_flag = f"-gencode=arch=compute_{arch},code=sm_{arch}"
            subprocess.run(["nvcc", *flags, arch_flag, "-c", str(unit), "-o", str(obj)], check=True, capture_output=True)
        sass = subprocess.run(["cuobjdump", "-sass", str(obj)], check=True, capture_output=True, text=True).stdout
        for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*\.{10,}|\n\s*Function :|\Z)", sass, re.S):
            kernels[name] = [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", body)]
    return kernels


def params_layout(source_dir: Path, work: Path) -> tuple[dict[int, str], int]:
    """({offset: field} of Params, sizeof(Params)) from the revision's own fff_cuda.h."""
    header = (source_dir / "fff_cuda.h").read_text()
    body = header[header.index("struct Params {") : header.index("};", header.index("struct Params {"))]
    fields = re.findall(r"^\s*[\w:<>\s\*]+?[\s\*](\w+);", body, re.M)
    program = work / f"layout_{hashlib.sha256(header.encode()).hexdigest()[:12]}.cpp"
    lines = [f'std::printf("%zu {f}\\n", offsetof(hf_fff_cuda::Params, {f}));' for f in fields]
    program.write_text(
        "#include <cstddef>\n#include <cstdio>\n#include \"fff_cuda.h\"\nint main() {\n"
        + "\n".join(lines)
        + '\nstd::printf("%zu sizeof\\n", sizeof(hf_fff_cuda::Params));\n}\n'
    )
    exe = program.with_suffix("")
    # nvcc compiles a .cpp as host C++ with the CUDA headers on the include path
    subprocess.run(["nvcc", "-std=c++17", f"-I{source_dir}", str(program), "-o", str(exe)], check=True, capture_output=True)
    out = dict(line.split(" ")[::-1] for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n") if line)
    size = int(out.pop("sizeof"))
    return {int(offset): field for field, offset in out.items()}, size


def demangle(names: list[str]) -> dict[str, str]:
    text = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, text.split("\n")))


def kernel_key(demangled: str) -> str:
    key = re.sub(r"\(anonymous namespace\)::", "", demangled)
    for pattern, replacement in RENAMES:
        key = pattern.sub(replacement, key)
    return key


def extra_args(mangled: str) -> list[tuple[int, int]]:
    """(size, alignment) of the arguments after Params, read from the mangled signature."""
    tail = mangled.split("NS_6ParamsE", 1)[1] if "NS_6ParamsE" in mangled else ""
    args = []
    while tail:
        for code, shape in ARG_TYPES.items():
            if tail.startswith(code):
                args.append(shape)
                tail = tail[len(code) :]
                break
        else:
            tail = tail[1:]  # qualifiers (K: const)
    return args


def normalize(instructions: list[str], arch: str, layout: tuple[dict[int, str], int], args: list[tuple[int, int]]) -> list[str]:
    fields, size = layout
    starts, offset = [], size
    for arg_size, align in args:
        offset = (offset + align - 1) // align * align
        starts.append((offset, arg_size))
        offset += arg_size
    field_starts = sorted(fields)

    def name(match: re.Match) -> str:
        at = int(match.group(1), 16) - PARAM_BASE[arch]
        if at < 0:
            return match.group(0)  # below the parameters: driver-provided constants
        if at < size:
            start = max(s for s in field_starts if s <= at)
            return f"c[0x0][Params.{fields[start]}+{at - start}]"
        for index, (start, arg_size) in enumerate(starts):
            if start <= at < start + arg_size:
                return f"c[0x0][arg{index + 1}+{at - start}]"
        return f"c[0x0][past+{at}]"

    return [re.sub(r"c\[0x0\]\[(0x[0-9a-f]+)\]", name, line) for line in instructions]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?")
    parser.add_argument("--arch", nargs="+", default=["80", "90"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hf_fff_compare_sass")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    trees = {
        "before": export_cuda(args.before, work / f"src-{args.before}"),
        "after": export_cuda(args.after, work / f"src-{args.after or 'worktree'}"),
    }
    layouts = {side: params_layout(tree, work) for side, tree in trees.items()}
    differ = 0
    for arch in args.arch:
        sass = {side: compile_sass(tree, arch, work) for side, tree in trees.items()}
        names = {side: demangle(list(kernels)) for side, kernels in sass.items()}
        keyed = {side: {kernel_key(names[side][k]): k for k in kernels} for side, kernels in sass.items()}
        same, changed = [], []
        for key in sorted(set(keyed["before"]) & set(keyed["after"])):
            old_name, new_name = keyed["before"][key], keyed["after"][key]
            old = normalize(sass["before"][old_name], arch, layouts["before"], extra_args(old_name))
            new = normalize(sass["after"][new_name], arch, layouts["after"], extra_args(new_name))
            (same if old == new else changed).append((key, len(new)))
        removed = sorted(set(keyed["before"]) - set(keyed["after"]))
        added = sorted(set(keyed["after"]) - set(keyed["before"]))
        print(f"sm_{arch}: {len(same)} kernels identical ({sum(n for _, n in same)} instructions), {len(changed)} differ, "
              f"{len(removed)} only before (deleted), {len(added)} only after")
        for key, _ in changed:
            print(f"  DIFFERS: {key}")
        for label, keys in (("only after", added), ("only before", removed)):
            families: dict[str, int] = {}
            for key in keys:  # grouped by kernel template: "single_kernel<...> x 18"
                family = re.sub(r"<.*", "", key.split("(")[0]).split(" ")[-1]
                families[family] = families.get(family, 0) + 1
            for family, count in sorted(families.items()):
                print(f"  {label}: {family} x {count}")
        differ += len(changed)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
