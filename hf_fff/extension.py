"""Just-in-time build of the native sources in cuda/ (installed as the package `hf_fff.csrc`).

`load_extension` compiles sources with `torch.utils.cpp_extension` + ninja the first time they are
needed, caches the result on disk for every later process, and never raises: when a compiler, ninja
or nvcc is missing, or the build fails, it warns once (naming the cause) and returns None, so that the
caller falls back to the plain torch implementation. A build says so with one line on stderr (a logging
warning) before the compiler starts, since it runs for about a minute without output.

The on-disk cache is `$HF_FFF_CACHE` or `~/.cache/hf_fff/extensions`, one folder per
`<name>-<hash>`, the hash covering everything that makes a binary unusable elsewhere: the sources'
contents, the flags, torch / CUDA / Python versions, the GPU arch list and the CPU model (kernels may be
built with `-march=native`). Concurrent processes serialise on an `flock` of that folder, so two
processes building at once end with one working build, and a build killed half-way leaves no lock
behind (torch's own lock file would then block every later process). A finished build records the
SHA-256 of its library, so a damaged cache is rebuilt instead of crashing the import. A finished build
is loaded without the lock, so a read-only cache that holds one (baked into a container image) works
without a compiler. A library is loaded only when this user or root owns it and its folder and no one
else can write to them: one owned by another user is refused (one warning, torch fallback), one of this
user's that others could have replaced is rebuilt.

Set HF_FFF_FORCE_BUILD_FAILURE=1 to make every build fail (for testing the fallback path).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

CACHE_ENV = "HF_FFF_CACHE"
FORCE_FAILURE_ENV = "HF_FFF_FORCE_BUILD_FAILURE"
_RECIPE_VERSION = "1"  # bump when this file changes how binaries are built
_LIB_SUFFIX = ".pyd" if os.name == "nt" else ".so"  # what torch's build names the library
_DONE_MARKER = "hf_fff_build_ok"  # sha256 of the library, written once a build loaded; else "rebuild"

logger = logging.getLogger(__name__)
_LOCK = threading.Lock()
_LOADED: dict[str, Optional[types.ModuleType]] = {}  # by request (name, sources, flags); None records a failure already warned about


class BuildUnavailable(Exception):
    """Why a native extension cannot be built here; its message goes into the one warning."""


def load_extension(
    name: str,
    sources: Sequence[str],
    *,
    with_cuda: bool = False,
    extra_cflags: Iterable[str] = (),
    extra_cuda_cflags: Iterable[str] = (),
    extra_ldflags: Iterable[str] = (),
) -> Optional[types.ModuleType]:
    """Build (or reuse) the extension `name` from `sources` (file names in cuda/); None if impossible.

    Sources define a pybind11 module with `PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)` (torch sets the
    macro; the module is named after the cache folder, `<name>_<hash>`). Repeated calls in one process return the same module,
    and a failure warns only the first time.
    """
    extra_cflags, extra_cuda_cflags, extra_ldflags = list(extra_cflags), list(extra_cuda_cflags), list(extra_ldflags)
    request = repr((name, list(sources), with_cuda, extra_cflags, extra_cuda_cflags, extra_ldflags))
    with _LOCK:
        if request in _LOADED:
            return _LOADED[request]
        try:
            module = _build_or_reuse(name, sources, with_cuda, extra_cflags, extra_cuda_cflags, extra_ldflags)
        except BuildUnavailable as cause:
            module = None
            _warn_fallback(name, str(cause))
        except Exception as error:  # a compiler error, a broken cache folder: any failure means "use torch"
            module = None
            _warn_fallback(name, f"the build failed: {_last_lines(str(error))}")
        _LOADED[request] = module
        return module


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_fff" / "extensions").expanduser()


def resolve_source(file_name: str) -> Path:
    """Path of a native source: the cuda/ folder beside this package (a checkout), else the installed `hf_fff.csrc`.

    The checkout comes first: with an editable install of another checkout on the path, `hf_fff.csrc`
    resolves to that other checkout's sources, which would silently build code this package was not
    written against.
    """
    candidates = [Path(__file__).resolve().parent.parent / "cuda" / file_name]
    with contextlib.suppress(ModuleNotFoundError):
        installed = importlib.resources.files("hf_fff.csrc").joinpath(file_name)
        if isinstance(installed, Path):  # a zipped install has no real path for the compiler to read
            candidates.append(installed)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise BuildUnavailable(f"source file {file_name!r} was not found (looked in {[str(c) for c in candidates]})")


def header_flags(headers: Sequence[str], include_dir: bool = False) -> list[str]:
    """A define carrying the headers' content hash, so that editing a header changes the cache key (the builder
    hashes the sources it compiles, not what they include); with include_dir, -I for the headers' folder first."""
    digest = hashlib.sha256()
    folder = None
    for header in headers:
        try:
            path = resolve_source(header)
        except BuildUnavailable:
            digest.update(header.encode())
            continue
        folder = path.parent
        digest.update(path.read_bytes())
    include = [f"-I{folder}"] if include_dir and folder is not None else []
    return include + [f"-DHF_FFF_HEADERS={digest.hexdigest()[:16]}"]


def cuda_arch_flags(extra_cuda_cflags: Sequence[str]) -> list[str]:
    """nvcc -gencode flags for the visible GPUs, or none when the caller or TORCH_CUDA_ARCH_LIST decides.

    Building only for the GPUs present keeps the build short; PTX for the newest one keeps the binary
    usable (through the driver's JIT) on a newer GPU sharing the cache folder.
    """
    if any("arch" in flag for flag in extra_cuda_cflags) or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch turns TORCH_CUDA_ARCH_LIST into flags itself, and it is part of the cache key
    if not torch.cuda.is_available():
        raise BuildUnavailable("no CUDA GPU is visible and TORCH_CUDA_ARCH_LIST is not set")
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    flags = [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}" for major, minor in capabilities]
    major, minor = capabilities[-1]
    return flags + [f"-gencode=arch=compute_{major}{minor},code=compute_{major}{minor}"]


def build_key(name: str, paths: Sequence[Path], with_cuda: bool, *flag_lists: Sequence[str]) -> str:
    """`<name>-<hash>`: the cache folder name, different whenever the binary could differ."""
    digest = hashlib.sha256()
    for part in (
        _RECIPE_VERSION,
        name,
        str(with_cuda),
        torch.__version__,
        str(torch.version.cuda),
        sys.implementation.cache_tag,  # the extension links against this Python's ABI
        platform.machine(),
        _cpu_identity(),
        cxx_compiler(),
        os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        repr([list(flags) for flags in flag_lists]),
    ):
        digest.update(part.encode() + b"\0")
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{name}-{digest.hexdigest()[:16]}"


def check_toolchain(with_cuda: bool) -> None:
    """Raise BuildUnavailable naming the first missing tool."""
    if os.environ.get(FORCE_FAILURE_ENV, "").strip() not in ("", "0"):
        raise BuildUnavailable(f"{FORCE_FAILURE_ENV} is set")
    compiler = cxx_compiler()
    if shutil.which(compiler) is None:
        raise BuildUnavailable(f"no C++ compiler found (looked for {compiler!r}; set CXX to choose one)")
    try:
        _cpp_extension().verify_ninja_availability()
    except RuntimeError:
        raise BuildUnavailable("ninja is not installed (pip install ninja)") from None
    if with_cuda:
        if torch.version.cuda is None:
            raise BuildUnavailable("this torch build has no CUDA support")
        if nvcc_path() is None:
            raise BuildUnavailable("the CUDA compiler nvcc was not found (set CUDA_HOME to the CUDA toolkit)")


def cxx_compiler() -> str:
    """The C++ compiler command builds use: $CXX, else `c++` (as torch.utils.cpp_extension)."""
    return os.environ.get("CXX", "c++")


def nvcc_path() -> Optional[Path]:
    """nvcc of the CUDA toolkit torch builds with (CUDA_HOME), or None."""
    cuda_home = _cpp_extension().CUDA_HOME
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        return None
    return Path(cuda_home) / "bin" / "nvcc"


def build_directory(
    name: str,
    sources: Sequence[str],
    *,
    with_cuda: bool = False,
    extra_cflags: Iterable[str] = (),
    extra_cuda_cflags: Iterable[str] = (),
    extra_ldflags: Iterable[str] = (),
) -> Path:
    """The cache folder that `load_extension` with the same arguments builds into (BuildUnavailable if none)."""
    return _plan(name, sources, with_cuda, list(extra_cflags), list(extra_cuda_cflags), list(extra_ldflags))[2]


def _plan(name, sources, with_cuda, extra_cflags, extra_cuda_cflags, extra_ldflags) -> tuple[list[Path], list[str], Path]:
    """(source paths, nvcc flags including the arch flags, cache folder) of one build."""
    paths = [resolve_source(source) for source in sources]
    if with_cuda:
        extra_cuda_cflags = extra_cuda_cflags + cuda_arch_flags(extra_cuda_cflags)
    key = build_key(name, paths, with_cuda, extra_cflags, extra_cuda_cflags, extra_ldflags)
    return paths, extra_cuda_cflags, cache_root() / key


def _build_or_reuse(name, sources, with_cuda, extra_cflags, extra_cuda_cflags, extra_ldflags) -> types.ModuleType:
    paths, extra_cuda_cflags, build_dir = _plan(name, sources, with_cuda, extra_cflags, extra_cuda_cflags, extra_ldflags)
    module_name = build_dir.name.replace("-", "_")  # one module name per build, so two builds can live in one process
    library = build_dir / f"{module_name}{_LIB_SUFFIX}"
    # A finished build never changes, so it is read without the lock (which needs write access): a cache
    # baked read-only into a container image loads without a compiler, ninja or a writable folder.
    if _is_intact(build_dir, library) and _trusted(build_dir, library):
        return _import_built(module_name, library)
    check_toolchain(with_cuda)
    with contextlib.ExitStack() as stack:
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_exclusive(build_dir / "hf_fff.lock"))
        except OSError as error:
            raise BuildUnavailable(
                f"the kernel cache {build_dir} holds no usable build and cannot be written ({error.strerror or error}); "
                f"set {CACHE_ENV} to a writable folder"
            ) from None
        if _is_intact(build_dir, library) and _trusted(build_dir, library):  # built by another process meanwhile
            return _import_built(module_name, library)
        # Not built, damaged (an interrupted copy, a full disk) or writable by others: build again. Removing
        # the library makes ninja relink it even when its timestamp looks up to date; only a killed build
        # can have left torch's lock file, since no live process builds without our flock.
        for leftover in (build_dir / _DONE_MARKER, library, build_dir / "lock"):
            leftover.unlink(missing_ok=True)
        _announce_build(name, build_dir)
        module = _cpp_extension().load(
            name=module_name,
            sources=[str(path) for path in paths],
            extra_cflags=extra_cflags,
            extra_cuda_cflags=extra_cuda_cflags,
            extra_ldflags=extra_ldflags,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            verbose=False,
        )
        _private(build_dir, library)
        (build_dir / _DONE_MARKER).write_text(_digest(library) + "\n")
        return module


def _trusted(build_dir: Path, library: Path) -> bool:
    """Whether loading `library` runs only code that this user (or root) put there.

    A library owned by another user, or that others may replace (group/world-writable library or
    folder), is refused: importing it would run their code in this process. One this user owns is
    rebuilt (returns False, after one warning); one owned by someone else cannot be, which raises
    BuildUnavailable so that the caller falls back to torch. root's files are trusted, as ssh does:
    a cache prebuilt by root in a container image serves unprivileged users.
    """
    if not hasattr(os, "geteuid"):  # Windows: no POSIX owners or modes to check
        return True
    me = os.geteuid()
    for path in (build_dir, library):
        status = path.stat()
        if status.st_uid not in (me, 0):
            raise BuildUnavailable(
                f"the cached build {path} belongs to another user (uid {status.st_uid}), so loading it would run their code; "
                f"set {CACHE_ENV} to a folder of your own"
            )
        if status.st_mode & 0o022:
            if status.st_uid != me:
                raise BuildUnavailable(f"the cached build {path} can be changed by other users; set {CACHE_ENV} to a folder of your own")
            warnings.warn(
                f"hf_fff: the cached build {path} could be changed by other users (mode {status.st_mode & 0o777:o}); rebuilding it",
                RuntimeWarning,
                stacklevel=5,
            )
            return False
    return True


def _private(build_dir: Path, library: Path) -> None:
    """Take write access from group and others (a umask of 002 would leave the build group-writable, which
    `_trusted` refuses)."""
    if hasattr(os, "geteuid"):
        for path in (build_dir, library):
            os.chmod(path, path.stat().st_mode & ~0o022)


def _is_intact(build_dir: Path, library: Path) -> bool:
    """Whether the library is the one a finished build recorded (a damaged one would crash the import)."""
    try:
        return (build_dir / _DONE_MARKER).read_text().strip() == _digest(library)
    except OSError:
        return False


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_built(module_name: str, library: Path) -> types.ModuleType:
    """Import a finished build without torch's load(): no compiler probe, no ninja run (fast start-up)."""
    spec = importlib.util.spec_from_file_location(module_name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the cached build {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path`; the OS drops it if the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on torch's own lock file
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpu_identity() -> str:
    """The CPU model and feature flags: a `-march=native` binary is only valid on a matching CPU."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
    return platform.processor()


def _announce_build(name: str, build_dir: Path) -> None:
    """One line on stderr before a build: the compiler runs for about a minute and prints nothing itself.

    A logging warning rather than warnings.warn: with warnings turned into errors (-W error) a warning here
    would abort the build and silently fall back to torch. Python prints it on stderr when logging is not
    configured; a configured application decides where it goes.
    """
    logger.warning("hf_fff: compiling the FFF kernel %r (about a minute, once; cached in %s)", name, build_dir)


def _warn_fallback(name: str, cause: str) -> None:
    warnings.warn(
        f"hf_fff: the native extension {name!r} is unavailable ({cause}); using the plain torch implementation instead, which is slower.",
        RuntimeWarning,
        stacklevel=3,  # point at the code that asked for the extension
    )


def _cpp_extension() -> types.ModuleType:
    """torch.utils.cpp_extension, imported on first need: it pulls in setuptools (~0.1 s)."""
    import torch.utils.cpp_extension

    return torch.utils.cpp_extension


def _last_lines(text: str, count: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-count:])
