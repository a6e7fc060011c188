"""hf_fff.extension: source lookup, cache keys, the single warning + torch fallback, concurrent builds.

Builds of the real kernel happen in subprocesses with their own HF_FFF_CACHE, so that the warning and
the cache are observed exactly as a user's fresh process sees them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

from hf_fff import extension
from hf_fff.backends import cpu

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh process: call the FFF op twice through the public API, report what happened as JSON.
FALLBACK_PROBE = textwrap.dedent(
    """
    import json, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import hf_fff
        from hf_fff import backends
        from hf_fff.backends import reference
        generator = torch.Generator().manual_seed(0)
        x, w_in, b_in, w_out = (torch.randn(*s, generator=generator) for s in ((5, 12), (15, 12), (15,), (15, 12)))
        y1, leaves1 = hf_fff.fast_feedforward(x, w_in, b_in, w_out, 3)
        hf_fff.FastFeedForward(12, 3)(x)  # the module path hits the same (already warned) loader
        y_ref, leaves_ref = reference.fff_forward(x, w_in, b_in, w_out, 3)
        backend = backends.resolve("cpu")[0]
    forced_error = ""
    try:
        with hf_fff.use_backend("cpp"):
            hf_fff.fast_feedforward(x, w_in, b_in, w_out, 3)
    except RuntimeError as error:
        forced_error = str(error)
    print(json.dumps({
        "backend": backend,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "hf_fff" in str(w.message)],
        "matches_reference": bool(torch.allclose(y1, y_ref, atol=1e-5, rtol=1e-5) and torch.equal(leaves1, leaves_ref)),
        "forced_error": forced_error,
    }))
    """
)

# Run in a fresh process: load the kernel, check it against the oracle, report the module file.
BUILD_PROBE = textwrap.dedent(
    """
    import json, time
    import torch
    from hf_fff.backends import cpu, reference
    start = time.perf_counter()
    module = cpu.load_module()
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    x, w_in, b_in, w_out = (torch.randn(*s, generator=generator) for s in ((40, 33), (63, 33), (63,), (63, 33)))
    y, leaves = module.fff_forward(x, w_in, b_in, w_out, 5)
    y_ref, leaves_ref = reference.fff_forward(x, w_in, b_in, w_out, 5)
    ok = bool(torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5) and torch.equal(leaves, leaves_ref))
    print(json.dumps({"file": module.__file__, "ok": ok, "seconds": seconds}))
    """
)


def run_probe(script: str, cache: Path, **env_overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_FFF_CACHE": str(cache), "PYTHONPATH": str(REPO), **env_overrides}
    env.pop("HF_FFF_BACKEND", None)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def probe_result(process: subprocess.Popen, timeout: float = 300) -> dict:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def cpu_build_directory() -> Path:
    return extension.build_directory(cpu.EXTENSION_NAME, cpu.SOURCES, extra_cflags=cpu.cflags(cpu.resolved_march()), extra_ldflags=cpu.LDFLAGS)


def test_sources_are_found_in_the_checkout():
    assert extension.resolve_source("fff_cpu.cpp") == REPO / "cuda" / "fff_cpu.cpp"
    with pytest.raises(extension.BuildUnavailable, match="no_such_file.cpp"):
        extension.resolve_source("no_such_file.cpp")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert extension.cache_root() == tmp_path / "elsewhere"
    assert cpu_build_directory().parent == tmp_path / "elsewhere"
    monkeypatch.delenv(extension.CACHE_ENV)
    assert extension.cache_root() == Path.home() / ".cache" / "hf_fff" / "extensions"


def test_cache_key_covers_everything_that_changes_the_binary(monkeypatch, tmp_path):
    source = tmp_path / "kernel.cpp"
    source.write_text("int f() { return 1; }\n")
    key = lambda flags=("-O3",): extension.build_key("k", [source], False, list(flags), [], [])  # noqa: E731
    base = key()
    assert base == key() and base.startswith("k-")
    assert key(("-O2",)) != base
    monkeypatch.setattr(extension, "_cpu_identity", lambda: "some other CPU")
    assert key() != base  # a -march=native binary must not be reused on another CPU
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key() != base
    monkeypatch.undo()
    source.write_text("int f() { return 2; }\n")
    assert key() != base


def test_missing_source_warns_once_and_returns_none():
    with pytest.warns(RuntimeWarning, match=r"no_such_kernel\.cpp.*plain torch"):
        assert extension.load_extension("missing_probe", ["no_such_kernel.cpp"]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert extension.load_extension("missing_probe", ["no_such_kernel.cpp"]) is None


@pytest.mark.skipif(torch.version.cuda is not None and torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_build_without_cuda_warns_and_returns_none():
    with pytest.warns(RuntimeWarning, match="CUDA"):
        assert extension.load_extension("cuda_probe", ["fff_cpu.cpp"], with_cuda=True) is None


@pytest.mark.slow
def test_forced_build_failure_warns_once_and_falls_back(tmp_path):
    report = probe_result(run_probe(FALLBACK_PROBE, tmp_path / "cache", **{extension.FORCE_FAILURE_ENV: "1"}))
    assert report["backend"] == "reference"
    assert len(report["warnings"]) == 1, report["warnings"]
    assert extension.FORCE_FAILURE_ENV in report["warnings"][0] and "plain torch" in report["warnings"][0]
    assert report["matches_reference"]
    assert "could not be loaded" in report["forced_error"]  # forcing the missing backend is a clear error


@pytest.mark.slow
def test_missing_compiler_is_named_in_the_warning(tmp_path):
    report = probe_result(run_probe(FALLBACK_PROBE, tmp_path / "cache", CXX="hf-fff-no-such-compiler"))
    assert report["backend"] == "reference" and report["matches_reference"]
    assert len(report["warnings"]) == 1 and "hf-fff-no-such-compiler" in report["warnings"][0]


@pytest.mark.slow
def test_two_processes_building_at_once_leave_a_working_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(extension.CACHE_ENV, str(cache))
    build_dir = cpu_build_directory()
    # A build killed half-way leaves torch's lock file behind; it must not block the next builds.
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()

    first, second = run_probe(BUILD_PROBE, cache), run_probe(BUILD_PROBE, cache)
    reports = [probe_result(first, timeout=600), probe_result(second, timeout=600)]
    assert all(report["ok"] for report in reports)
    assert {Path(report["file"]).parent for report in reports} == {build_dir}
    assert [path.name for path in cache.iterdir()] == [build_dir.name]
    library = Path(reports[0]["file"])
    built_at = library.stat().st_mtime_ns

    third = probe_result(run_probe(BUILD_PROBE, cache))
    assert third["ok"] and Path(third["file"]) == library
    assert library.stat().st_mtime_ns == built_at  # reused, not rebuilt

    library.write_bytes(library.read_bytes()[:1000])  # a damaged cache (disk full, interrupted copy)
    fourth = probe_result(run_probe(BUILD_PROBE, cache))
    assert fourth["ok"] and Path(fourth["file"]) == library  # rebuilt in place, silently


class FakeCompiler:
    """Stands in for torch.utils.cpp_extension: 'builds' by writing the library file and counting the builds."""

    CUDA_HOME = None

    def __init__(self):
        self.builds = 0

    def verify_ninja_availability(self):
        pass

    def load(self, name, build_directory, **kwargs):
        self.builds += 1
        Path(build_directory, f"{name}{extension._LIB_SUFFIX}").write_bytes(b"built library")
        return types.ModuleType(name)


def test_a_build_announces_itself_once_on_stderr(monkeypatch, tmp_path, caplog):
    compiler = FakeCompiler()
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(extension, "_cpp_extension", lambda: compiler)
    monkeypatch.setattr(extension, "check_toolchain", lambda with_cuda: None)
    monkeypatch.setattr(extension, "_import_built", lambda module_name, library: types.ModuleType(module_name))
    monkeypatch.setattr(extension, "_LOADED", {})
    with caplog.at_level(logging.WARNING, logger="hf_fff.extension"):
        assert extension.load_extension("announce_probe", ["fff_cpu.cpp"]) is not None
        assert extension.load_extension("announce_probe", ["fff_cpu.cpp"]) is not None  # same process: no new build
        extension._LOADED.clear()
        assert extension.load_extension("announce_probe", ["fff_cpu.cpp"]) is not None  # new process: the cache
    assert compiler.builds == 1
    announcements = [record.getMessage() for record in caplog.records if "compiling" in record.getMessage()]
    build_dir = extension.build_directory("announce_probe", ["fff_cpu.cpp"])
    assert announcements == [f"hf_fff: compiling the FFF kernel 'announce_probe' (about a minute, once; cached in {build_dir})"]
    assert "\n" not in announcements[0]


@pytest.mark.slow
def test_the_announcement_reaches_stderr_without_logging_configured(tmp_path):
    """A user's process that never configured logging still sees the line (Python's last-resort handler)."""
    script = textwrap.dedent(
        """
        import types
        from pathlib import Path
        from hf_fff import extension

        class Compiler:
            CUDA_HOME = None
            def verify_ninja_availability(self):
                pass
            def load(self, name, build_directory, **kwargs):
                Path(build_directory, name + extension._LIB_SUFFIX).write_bytes(b"built")
                return types.ModuleType(name)

        extension._cpp_extension = Compiler
        extension.check_toolchain = lambda with_cuda: None
        assert extension.load_extension("announce_probe", ["fff_cpu.cpp"]) is not None
        """
    )
    process = run_probe(script, tmp_path / "cache")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "compiling the FFF kernel" in line]
    assert len(lines) == 1 and str(tmp_path / "cache") in lines[0]


# ---------------------------------------------------------------- caches this user did not (or cannot) write


def _cache_with_a_valid_build(cache: Path, monkeypatch) -> Path:
    """A cache holding a finished CPU build: a copy of this user's default cache when it has one, else built now."""
    monkeypatch.delenv(extension.CACHE_ENV, raising=False)
    existing = cpu_build_directory()
    monkeypatch.setenv(extension.CACHE_ENV, str(cache))
    build_dir = cpu_build_directory()
    library = build_dir / f"{build_dir.name.replace('-', '_')}{extension._LIB_SUFFIX}"
    if extension._is_intact(existing, existing / library.name):
        shutil.copytree(existing, build_dir, symlinks=True)
    else:
        assert probe_result(run_probe(BUILD_PROBE, cache), timeout=600)["ok"]
    (build_dir / "hf_fff.lock").unlink(missing_ok=True)  # a cache image ships without one
    return build_dir


def _run_read_only(script: str, cache: Path, **env_overrides: str) -> dict:
    """Run `script` with `cache` read-only: a read-only bind mount for root (who writes through any mode),
    the write bits removed for anyone else."""
    if os.geteuid() != 0:
        for path in (cache, *cache.rglob("*")):
            path.chmod(path.stat().st_mode & ~0o222)
        return probe_result(run_probe(script, cache, **env_overrides))
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root, and no mount namespace to make the cache read-only in")
    runner = f'mount --bind -o ro "$0" "$0" && exec "{sys.executable}" -c "$1"'
    env = {**os.environ, "HF_FFF_CACHE": str(cache), "PYTHONPATH": str(REPO), **env_overrides}
    env.pop("HF_FFF_BACKEND", None)
    process = subprocess.Popen(["unshare", "-m", "sh", "-c", runner, str(cache), script], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return probe_result(process)


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
def test_a_read_only_cache_with_a_valid_build_is_used(tmp_path, monkeypatch):
    """A kernel cache baked into a container image: read-only, no compiler needed."""
    cache = tmp_path / "cache"
    _cache_with_a_valid_build(cache, monkeypatch)
    report = _run_read_only(FALLBACK_PROBE, cache, **{extension.FORCE_FAILURE_ENV: "1"})  # any build attempt would fail
    assert report["warnings"] == []
    assert report["backend"] == "cpp" and report["matches_reference"]


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
def test_a_read_only_cache_without_a_build_warns_once_and_falls_back(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    report = _run_read_only(FALLBACK_PROBE, cache)
    assert report["backend"] == "reference" and report["matches_reference"]
    assert len(report["warnings"]) == 1 and "cannot be written" in report["warnings"][0] and "HF_FFF_CACHE" in report["warnings"][0]


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
def test_a_library_of_another_user_is_never_loaded(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("only root can give the cached build to another user")
    build_dir = _cache_with_a_valid_build(tmp_path / "cache", monkeypatch)
    for path in (build_dir, *build_dir.iterdir()):
        os.chown(path, 12345, 12345)
    report = probe_result(run_probe(FALLBACK_PROBE, tmp_path / "cache"))
    assert report["backend"] == "reference" and report["matches_reference"]
    assert len(report["warnings"]) == 1 and "another user (uid 12345)" in report["warnings"][0]


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
@pytest.mark.parametrize("loose", ["library", "folder"])
def test_a_library_others_can_replace_is_rebuilt_not_loaded(tmp_path, monkeypatch, loose):
    build_dir = _cache_with_a_valid_build(tmp_path / "cache", monkeypatch)
    library = build_dir / f"{build_dir.name.replace('-', '_')}{extension._LIB_SUFFIX}"
    target = library if loose == "library" else build_dir
    target.chmod(target.stat().st_mode | 0o022)
    # The rebuild is made to fail at once, so that the test sees the refusal without a minutes-long build.
    report = probe_result(run_probe(FALLBACK_PROBE, tmp_path / "cache", **{extension.FORCE_FAILURE_ENV: "1"}))
    assert report["backend"] == "reference" and report["matches_reference"]
    assert any("could be changed by other users" in w and "rebuilding" in w for w in report["warnings"])


def test_a_module_without_the_entry_point_falls_back_with_one_warning(monkeypatch):
    import types

    import hf_fff
    from hf_fff import backends
    from hf_fff.backends import reference

    monkeypatch.setattr(cpu, "load_module", lambda: types.ModuleType("fff_cpu_without_fff_forward"))
    monkeypatch.delenv("HF_FFF_BACKEND", raising=False)
    backends._reset_for_tests()
    try:
        generator = torch.Generator().manual_seed(3)
        x, w_in, b_in, w_out = (torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((5, 12), (15, 12), (15,), (15, 12)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1, leaves1 = hf_fff.fast_feedforward(x, w_in, b_in, w_out, 3)
            y2, _ = hf_fff.fast_feedforward(x, w_in, b_in, w_out, 3)
        y_ref, leaves_ref = reference.fff_forward(x, w_in, b_in, w_out, 3)
        assert torch.equal(y1, y_ref) and torch.equal(y2, y_ref) and torch.equal(leaves1, leaves_ref)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "fff_forward" in messages[0] and "'cpp'" in messages[0]
        assert backends.resolve("cpu")[0] == "reference"
    finally:
        monkeypatch.undo()
        backends._reset_for_tests()


def test_the_cpu_module_is_looked_up_once_per_target(monkeypatch):
    """Per-call users (the hashed dropout asks for the module at every call) must not re-read and hash the
    headers each time: that took ~0.4 ms a call, 44 of a toy training step's 76 ms."""
    from hf_fff.backends import cpu

    reads = []
    real_header_flags = extension.header_flags
    monkeypatch.setattr(extension, "header_flags", lambda *args, **kwargs: reads.append(args) or real_header_flags(*args, **kwargs))
    cpu._load_module_for.cache_clear()
    first = cpu.load_module()
    assert all(cpu.load_module() is first for _ in range(5))
    assert len(reads) == 1
