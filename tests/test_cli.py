"""`hf-fff demo` and `hf-fff env` through the console entry point (bench/convert/push have their own tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import hf_fff
from hf_fff import backends, extension
from hf_fff_cli import SUBCOMMANDS, build_parser, main

from _model_helpers import FIXTURES, train_tokenizer


def test_every_subcommand_has_help(capsys):
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert name in capsys.readouterr().out


def test_missing_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2


@pytest.fixture
def no_kernel_build(monkeypatch):
    """`hf-fff env` without building the kernel (the build has its own tests in test_extension.py)."""
    monkeypatch.setattr(backends, "resolve", lambda device: ("reference", None))


def test_env_reports_versions_compilers_cache_and_backends(capsys, monkeypatch, tmp_path, no_kernel_build):
    from hf_fff.tools.environment import describe

    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path / "kernels"))
    rows = dict(describe())
    assert rows["hf_fff"] == hf_fff.__version__
    assert rows["kernel cache"] == str(tmp_path / "kernels")
    compiler = shutil.which(extension.cxx_compiler())
    if compiler:
        assert rows["C++ compiler"].startswith(compiler + ": ") and "version unknown" not in rows["C++ compiler"]
    else:
        assert rows["C++ compiler"].startswith("not found")
    if shutil.which("nvcc") or extension.nvcc_path():
        assert "release" in rows["nvcc"]
    else:
        assert rows["nvcc"].startswith("not found")
    assert rows["FFF backend on cpu"] == "reference"
    assert main(["env"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in printed] == list(rows)
    assert all(line.rstrip().endswith(value) for line, value in zip(printed, rows.values()))


def test_env_names_a_missing_compiler(monkeypatch, no_kernel_build):
    from hf_fff.tools.environment import describe

    monkeypatch.setenv("CXX", "hf-fff-no-such-compiler")
    assert dict(describe())["C++ compiler"].startswith("not found (looked for 'hf-fff-no-such-compiler'")


@pytest.mark.slow
def test_demo_without_cached_weights_is_labelled_random(capsys):
    """The session's HF cache is empty (see conftest), as on a fresh offline machine."""
    assert main(["demo", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert out.count("fill-mask:") == 2 and "''" not in out


def test_demo_on_a_local_published_checkpoint(tmp_path, capsys):
    folder = tmp_path / "crammed"
    shutil.copytree(FIXTURES / "crammed-tiny-1x3", folder)
    train_tokenizer(128).save_pretrained(folder)
    assert main(["demo", "--model", str(folder), "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "pretrained weights" in out and "RANDOM" not in out
    assert out.count("fill-mask:") == 2


def test_demo_on_a_folder_without_a_tokenizer_says_how_to_get_one(tmp_path, capsys):
    folder = tmp_path / "crammed"
    shutil.copytree(FIXTURES / "crammed-tiny-1x3", folder)  # weights, no tokenizer
    assert main(["demo", "--model", str(folder), "--no-bench"]) == 1
    captured = capsys.readouterr()
    assert str(folder) in captured.err and "tokenizer.json" in captured.err and "hf-fff convert" in captured.err
    assert "RANDOM" not in captured.out


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated weights", "config list", "not a model"])
def test_demo_with_a_damaged_local_model_is_a_clear_error(tmp_path, capsys, damage):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "crammed-tiny-1x3", folder)
    train_tokenizer(128).save_pretrained(folder)
    if damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:500])
    elif damage == "config list":
        (folder / "config.json").write_text("[1, 2]")
    else:
        (folder / "config.json").write_text('{"model_type": "no-such-model"}')
    assert main(["demo", "--model", str(folder), "--no-bench"]) == 1
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert f"cannot load {folder}" in line
    assert "RANDOM" not in out  # the user's model, not noise in its place


def _never_run(**kwargs):
    raise AssertionError("the benchmark ran although its --json file cannot be written")


@pytest.mark.parametrize("where", ["under a file", "a folder", "read-only folder"])
def test_bench_refuses_an_unwritable_json_path_before_the_run(tmp_path, capsys, monkeypatch, where):
    import os

    from hf_fff.tools import bench

    monkeypatch.setattr(bench, "run_bench", _never_run)
    if where == "under a file":
        (tmp_path / "file.txt").write_text("x")
        path = tmp_path / "file.txt" / "bench.json"
    elif where == "a folder":
        path = tmp_path
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        path = tmp_path / "ro" / "bench.json"
    assert main(["bench", "--tokens", "1", "--json", str(path)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(path) in line
    assert not (tmp_path / "ro" / "bench.json").exists()


def test_bench_json_check_leaves_no_file_behind(tmp_path, monkeypatch):
    from hf_fff.tools import bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: seen.update(exists=(tmp_path / "b.json").exists()))
    assert main(["bench", "--tokens", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert seen == {"exists": False}


def test_interrupt_is_one_line_and_status_130(monkeypatch, capsys):
    from hf_fff.tools import environment

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(environment, "describe", interrupted)
    assert main(["env"]) == 130
    assert "interrupted" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["bench", "--dtype", "int3"], ["push"]])
def test_help_version_and_usage_errors_import_neither_torch_nor_the_package(argv):
    # The console script's module answers these before anything heavy loads: in about the time Python starts.
    probe = (
        "import sys, hf_fff_cli\n"
        "try:\n"
        f"    hf_fff_cli.main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "heavy = sorted(name for name in ('hf_fff', 'torch', 'transformers') if name in sys.modules)\n"
        "print('exit', code, 'imported', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    expected_code = 0 if argv[0] in ("--help", "--version") else 2
    assert f"exit {expected_code} imported []" in result.stdout, result.stdout + result.stderr


def test_version_is_the_package_version(capsys):
    import hf_fff

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"hf-fff {hf_fff.__version__}"
