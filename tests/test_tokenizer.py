"""AutoTokenizer on UltraFastBERT folders: tokenizer.json loads as is; a folder without a tokenizer gets a clear error."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

import hf_fff

from _model_helpers import FIXTURES, tiny_config

TEXT = "the quick brown fox routes each token down a tree"


def model_only_folder(tmp_path):
    folder = tmp_path / "model-only"
    hf_fff.UltraFastBertForMaskedLM(tiny_config()).save_pretrained(folder)
    return folder


def published_layout_folder(tmp_path):
    folder = tmp_path / "crammed"
    folder.mkdir()
    shutil.copyfile(FIXTURES / "crammed-tiny-1x3" / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("make_folder", [model_only_folder, published_layout_folder], ids=["native", "published-layout"])
def test_folder_without_a_tokenizer_names_the_folder_and_the_way_out(tmp_path, make_folder):
    folder = make_folder(tmp_path)
    with pytest.raises(OSError) as raised:
        AutoTokenizer.from_pretrained(folder)
    message = str(raised.value)
    assert str(folder) in message and "tokenizer.json" in message
    assert "pbelcak/UltraFastBERT-1x11-long" in message and "hf-fff convert" in message
    assert "sentencepiece" not in message


def test_a_bare_tokenizer_json_loads_without_a_tokenizer_config(tmp_path, tiny_tokenizer):
    folder = model_only_folder(tmp_path)
    tiny_tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))  # no tokenizer_config.json beside it
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, hf_fff.UltraFastBertTokenizerFast)
    assert tokenizer(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]


def test_a_tokenizer_config_naming_its_class_still_decides(tmp_path, tiny_tokenizer):
    folder = model_only_folder(tmp_path)
    tiny_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer) is type(tiny_tokenizer)
    assert tokenizer(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
