"""`hf-fff demo` and `hf-fff env` through the console entry point (bench/convert/push have their own tests)."""

from __future__ import annotations

import shutil

import pytest

from hf_fff.cli import SUBCOMMANDS, build_parser, main

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


def test_env_reports_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "FFF backend on cpu" in out and "torch" in out


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
