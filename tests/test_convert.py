"""`hf-fff convert` / hf_fff.tools.convert.convert: crammedBERT (or native) -> native folder, checked and atomic."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_fff  # noqa: F401 - registers the model type with the Auto classes
from conftest import FIXTURES_DIR, HUB_TOKEN
from hf_fff.tools.convert import ConversionError, convert
from hf_fff.tools.hub import split_front_matter

convert_module = importlib.import_module("hf_fff.tools.convert")  # the module, whatever `hf_fff.tools.convert` is bound to


def leftovers(parent: Path) -> list[str]:
    """Hidden partial/old folders a conversion may have left next to DST."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name))


def reference_logits_match(folder: Path, fixture: str) -> float:
    """Max relative error of DST's MLM logits against the authors' outputs, over non-padded positions."""
    from transformers import AutoModelForMaskedLM

    reference = load_file(FIXTURES_DIR / fixture / "reference_outputs.safetensors")
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    keep = reference["attention_mask"].bool()
    expected = reference["mlm_logits"][keep]
    return ((logits[keep] - expected).abs().max() / expected.abs().max()).item()


def test_convert_crammed_fixture_computes_the_published_model(crammed_tiny: Path, tmp_path: Path):
    dst = tmp_path / "out" / "UltraFastBERT-tiny"
    report = convert(crammed_tiny, dst)

    assert report.source_layout == "crammedBERT"
    assert report.architecture == "UltraFastBertForMaskedLM"
    assert report.max_rel_error <= 1e-5
    assert report.dtype == "float32"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= set(report.files)
    assert sorted(p.name for p in dst.iterdir()) == report.files

    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "ultrafastbert"
    assert config["architectures"] == ["UltraFastBertForMaskedLM"]
    # DST itself (not just SRC through our loader) computes what the original code computed.
    assert reference_logits_match(dst, crammed_tiny.name) <= 1e-5

    metadata, body = split_front_matter((dst / "README.md").read_text())
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "fill-mask"
    assert "ultrafastbert" in metadata["tags"]
    assert "import hf_fff" in body and "AutoModelForMaskedLM" in body
    assert "max relative error" in body  # the reload check is recorded in the card's provenance
    assert leftovers(dst.parent) == []


@pytest.mark.parametrize("dtype, torch_dtype, stored", [("bf16", torch.bfloat16, "BF16"), ("fp16", torch.float16, "F16")])
def test_convert_to_half_precision(crammed_1x3: Path, tmp_path: Path, dtype, torch_dtype, stored):
    from transformers import AutoModelForMaskedLM

    dst = tmp_path / "half"
    report = convert(crammed_1x3, dst, dtype=dtype)
    assert report.dtype == str(torch_dtype).replace("torch.", "")
    assert report.max_rel_error <= report.tolerance
    assert report.max_rel_error_vs_float32 is not None and 0 < report.max_rel_error_vs_float32 < 0.1
    with safe_open(dst / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {stored}
    assert json.loads((dst / "config.json").read_text())["dtype"] == report.dtype
    model = AutoModelForMaskedLM.from_pretrained(dst)
    assert model.dtype == torch_dtype


def test_convert_native_source_and_dtype_aliases(converted_tiny: Path, tmp_path: Path):
    report = convert(converted_tiny, tmp_path / "again", dtype=torch.float32)
    assert report.source_layout == "ultrafastbert"
    assert report.max_rel_error == 0.0
    with pytest.raises(ValueError, match="dtype"):
        convert(converted_tiny, tmp_path / "bad-dtype", dtype="int8")
    assert not (tmp_path / "bad-dtype").exists()


def _damage(folder: Path, how: str) -> str:
    """Damage a crammed checkpoint in place; return the text the error must contain."""
    path = folder / "model.safetensors"
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    state = load_file(path)
    if how == "nan":
        state["encoder.layers.1.ffn.linear_in.weight"][3, 5] = float("nan")
        name = "encoder.layers.1.ffn.linear_in.weight"
    elif how == "shape":
        state["encoder.layers.0.attn.dense.weight"] = state["encoder.layers.0.attn.dense.weight"][:, :-1].contiguous()
        name = "encoder.layers.0.attn.dense.weight"
    elif how == "missing":
        del state["encoder.layers.1.norm2.bias"]
        name = "encoder.layers.1.norm2.bias"
    save_file(state, path)
    return name


@pytest.mark.parametrize("how", ["truncated", "nan", "shape", "missing"])
def test_damaged_crammed_checkpoint_fails_naming_the_problem(crammed_1x3: Path, tmp_path: Path, how):
    expected = _damage(crammed_1x3, how)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "dst"
    with pytest.raises(ConversionError, match="damaged") as caught:
        convert(crammed_1x3, dst)
    assert expected in str(caught.value)
    assert not dst.exists()
    assert leftovers(dst.parent) == []


@pytest.mark.parametrize("how", ["shape", "missing", "nan"])
def test_damaged_native_checkpoint_fails_naming_the_tensor(converted_tiny: Path, tmp_path: Path, how):
    src = tmp_path / "native"
    shutil.copytree(converted_tiny, src)
    path = src / "model.safetensors"
    state = load_file(path)
    key = "ultrafastbert.encoder.layers.0.ffn.bias_in"
    if how == "shape":
        state[key] = state[key][:-1].contiguous()
    elif how == "missing":
        del state[key]
    else:
        state[key][0] = float("inf")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="damaged") as caught:
        convert(src, tmp_path / "dst")
    assert key in str(caught.value)
    assert not (tmp_path / "dst").exists()


def test_failed_reload_check_leaves_nothing_behind(crammed_1x3: Path, tmp_path: Path, monkeypatch):
    """A writer that corrupts one weight: the check must catch it and DST must never appear."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def corrupting_save(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        path = Path(directory) / "model.safetensors"
        state = load_file(path)
        state["ultrafastbert.encoder.layers.1.ffn.weight_out"] *= 1.5
        save_file(state, path, metadata={"format": "pt"})

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", corrupting_save)
    dst = tmp_path / "out" / "dst"
    with pytest.raises(ConversionError, match="differ"):
        convert(crammed_1x3, dst)
    assert not dst.exists()
    assert leftovers(dst.parent) == []


def _fresh_crammed(parent: Path, name: str = "fresh") -> Path:
    folder = parent / name
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        (folder / file).write_bytes((FIXTURES_DIR / "crammed-tiny-1x3" / file).read_bytes())
    return folder


def test_existing_dst_needs_overwrite_and_is_replaced_only_on_success(crammed_1x3: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    convert(crammed_1x3, dst)
    with pytest.raises(ConversionError, match="not empty"):
        convert(crammed_1x3, dst)

    _damage(crammed_1x3, "nan")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(ConversionError):
        convert(crammed_1x3, dst, overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # a failed conversion does not touch DST

    report = convert(_fresh_crammed(tmp_path), dst, overwrite=True)  # a previous model folder is replaced
    assert sorted(p.name for p in dst.iterdir()) == report.files
    assert not (dst / "tokenizer.json").exists()  # the previous folder's files are gone, not merged
    assert leftovers(tmp_path) == []


def test_overwrite_never_deletes_files_convert_did_not_write(crammed_1x3: Path, tmp_path: Path):
    unrelated = tmp_path / "projects"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    (unrelated / "data").mkdir()
    (unrelated / "data" / "train.csv").write_text("a,b\n")
    with pytest.raises(ConversionError, match="not a previous model folder.*notes.txt"):
        convert(crammed_1x3, unrelated, overwrite=True)
    assert (unrelated / "notes.txt").read_text() == "keep me" and (unrelated / "data" / "train.csv").is_file()

    model = tmp_path / "model"
    convert(crammed_1x3, model)
    (model / ".env").write_text("SECRET=1")  # a model folder with something of the user's in it
    with pytest.raises(ConversionError, match=r"\.env"):
        convert(crammed_1x3, model, overwrite=True)
    assert (model / ".env").read_text() == "SECRET=1" and (model / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_empty_dst_is_used_like_git_clone(crammed_1x3: Path, tmp_path: Path):
    dst = tmp_path / "empty"
    dst.mkdir()
    convert(crammed_1x3, dst)
    assert (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["src", "parent of src", "cwd", "home", "root"])
def test_dangerous_destinations_are_refused_even_with_overwrite(crammed_1x3: Path, tmp_path: Path, monkeypatch, where):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    dst = {"src": crammed_1x3, "parent of src": crammed_1x3.parent, "cwd": Path("."), "home": Path("~"), "root": Path("/")}[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ConversionError, match="SRC|current directory|home directory|filesystem root"):
        convert(crammed_1x3, dst, overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_dst_created_during_the_conversion_is_never_replaced(crammed_1x3: Path, tmp_path: Path, monkeypatch, overwrite):
    """Another program (or a second convert) writes DST while the check runs: the final rename must refuse."""
    dst = tmp_path / "dst"
    if overwrite:
        convert(crammed_1x3, dst)
    original = convert_module._check_tokenizer

    def meanwhile(folder):
        original(folder)
        dst.mkdir(exist_ok=True)
        (dst / "theirs.txt").write_text("written by someone else")

    monkeypatch.setattr(convert_module, "_check_tokenizer", meanwhile)
    with pytest.raises(ConversionError, match="DST"):
        convert(crammed_1x3, dst, overwrite=overwrite)
    assert (dst / "theirs.txt").read_text() == "written by someone else"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_usual_permissions(crammed_1x3: Path, tmp_path: Path, umask):
    previous = os.umask(umask)
    try:
        report = convert(crammed_1x3, tmp_path / "dst")
    finally:
        os.umask(previous)
    dst = tmp_path / "dst"
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {name: (dst / name).stat().st_mode & 0o777 for name in report.files}
    assert modes == {name: 0o666 & ~umask for name in report.files}  # model.safetensors included


# In a fresh process: convert, pausing inside the check (the temporary folder exists) until signalled.
_SLOW_CONVERT = """
import sys, time
from pathlib import Path
from hf_fff.tools import convert as convert_module
original = convert_module._check_tokenizer
def slow(folder):
    original(folder)
    Path(sys.argv[3]).write_text("converting")
    time.sleep(120)
convert_module._check_tokenizer = slow
convert_module.convert(sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_conversion_leaves_no_partial_folder(crammed_1x3: Path, tmp_path: Path, signum):
    out, marker = tmp_path / "out", tmp_path / "marker"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(crammed_1x3), str(out / "dst"), str(marker)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the conversion never reached its check"
            time.sleep(0.1)
        assert leftovers(out)  # the partial folder exists now
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "Traceback" not in stderr or signum == signal.SIGINT  # SIGTERM exits quietly
    assert list(out.iterdir()) == []


def test_missing_tokenizer_is_reported(tmp_path: Path):
    src = tmp_path / "bare"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        (src / name).write_bytes((FIXTURES_DIR / "crammed-tiny-4x2" / name).read_bytes())
    report = convert(src, tmp_path / "dst")
    assert any("no tokenizer files" in w for w in report.warnings)
    assert not (tmp_path / "dst" / "tokenizer.json").exists()


def test_source_card_metadata_is_carried_over(crammed_1x3: Path, tmp_path: Path):
    (crammed_1x3 / "README.md").write_text(
        "---\nlicense: apache-2.0\ndatasets:\n- EleutherAI/pile\nlanguage: en\ntags:\n- encoder\n---\n\n# The original card\n"
    )
    dst = tmp_path / "dst"
    convert(crammed_1x3, dst, base_model="someone/original")
    metadata, body = split_front_matter((dst / "README.md").read_text())
    assert metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["EleutherAI/pile"]
    assert metadata["language"] == "en"
    assert metadata["base_model"] == "someone/original"
    assert {"encoder", "ultrafastbert"} <= set(metadata["tags"])
    assert "The original card" not in body


def test_convert_from_a_hub_repo_id(lfs_hub, hub_token, crammed_1x3: Path, tmp_path: Path):
    """SRC as a Hub id: the crammed repo is served by the fake hub and downloaded into a fresh cache."""
    from huggingface_hub import HfApi

    api = HfApi(token=HUB_TOKEN)
    api.create_repo("tester/UltraFastBERT-tiny-crammed")
    api.upload_folder(repo_id="tester/UltraFastBERT-tiny-crammed", folder_path=crammed_1x3)

    dst = tmp_path / "from-hub"
    report = convert("tester/UltraFastBERT-tiny-crammed", dst)
    assert report.source_layout == "crammedBERT"
    assert reference_logits_match(dst, "crammed-tiny-1x3") <= 1e-5
    metadata, _ = split_front_matter((dst / "README.md").read_text())
    assert metadata["base_model"] == "tester/UltraFastBERT-tiny-crammed"

    with pytest.raises(ConversionError, match="cannot download"):
        convert("tester/no-such-repo", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_cli_convert_prints_the_check_and_fails_on_damage(crammed_1x3: Path, tmp_path: Path, capsys):
    from hf_fff_cli import main

    assert main(["convert", str(crammed_1x3), str(tmp_path / "ok"), "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "max relative error" in out and "bfloat16" in out

    name = _damage(crammed_1x3, "shape")
    assert main(["convert", str(crammed_1x3), str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and name in err
    assert not (tmp_path / "bad").exists()


def test_hf_fff_cli_routes_convert(crammed_1x3: Path, tmp_path: Path, capsys):
    from hf_fff_cli import main

    assert main(["convert", str(crammed_1x3), str(tmp_path / "via-cli")]) == 0
    assert "max relative error" in capsys.readouterr().out
    assert (tmp_path / "via-cli" / "model.safetensors").is_file()


def test_package_convert_is_the_tool_function():
    """`hf_fff.convert` is the conversion function, loaded on first use from hf_fff.tools.convert."""
    import hf_fff

    assert hf_fff.convert is convert_module.convert
    assert os.path.basename(convert_module.__file__) == "convert.py"
