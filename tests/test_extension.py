"""hf_fff.extension: source lookup, cache keys, the single warning + torch fallback, concurrent builds.

Builds of the real kernel happen in subprocesses with their own HF_FFF_CACHE, so that the warning and
the cache are observed exactly as a user's fresh process sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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


def test_forced_build_failure_warns_once_and_falls_back(tmp_path):
    report = probe_result(run_probe(FALLBACK_PROBE, tmp_path / "cache", **{extension.FORCE_FAILURE_ENV: "1"}))
    assert report["backend"] == "reference"
    assert len(report["warnings"]) == 1, report["warnings"]
    assert extension.FORCE_FAILURE_ENV in report["warnings"][0] and "plain torch" in report["warnings"][0]
    assert report["matches_reference"]
    assert "could not be loaded" in report["forced_error"]  # forcing the missing backend is a clear error


def test_missing_compiler_is_named_in_the_warning(tmp_path):
    report = probe_result(run_probe(FALLBACK_PROBE, tmp_path / "cache", CXX="hf-fff-no-such-compiler"))
    assert report["backend"] == "reference" and report["matches_reference"]
    assert len(report["warnings"]) == 1 and "hf-fff-no-such-compiler" in report["warnings"][0]


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
