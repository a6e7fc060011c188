"""hf_fff.tools.bench at toy sizes: tables, JSON and the PNG come out well-formed (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fff import cli
from hf_fff.tools import bench

TINY_MODELS = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300, fff_depth=2)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    results = bench.run_bench(
        tokens=(0, 1, 9),
        repeats=2,
        hidden=24,
        depth=3,
        encoder_batch=2,
        encoder_seq=5,
        model_overrides=TINY_MODELS,
        json_path=str(folder / "bench.json"),
        plot_path=str(folder / "bench.png"),
    )
    return results, folder


@pytest.mark.slow
def test_layer_rows_cover_every_implementation_and_token_count(tiny_results):
    results, _ = tiny_results
    layer = results["layer"]
    assert layer["baselines"] == ["dense 24-96-24", "dense 24-15-24"]
    names = {row["name"] for row in layer["rows"]}
    assert {"FFF (reference torch)", "FFF (masked, published)", *layer["baselines"]} <= names
    assert any(name.startswith("FFF (") and name.endswith(", auto)") for name in names)
    assert sorted({row["tokens"] for row in layer["rows"]}) == [0, 1, 9]
    for row in layer["rows"]:
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] and row["samples"] >= 2
        is_baseline = row["name"] in layer["baselines"]
        assert bool(row["speedup"]) != is_baseline
        if not is_baseline:
            assert set(row["speedup"]) == set(layer["baselines"]) and all(v > 0 for v in row["speedup"].values())


@pytest.mark.slow
def test_encoder_rows_compare_against_bert_on_the_same_batch(tiny_results):
    results, _ = tiny_results
    encoder = results["encoder"]
    assert encoder["batch"] == 2 and encoder["seq"] == 5
    assert encoder["ultrafastbert"]["hidden_size"] == encoder["bert"]["hidden_size"] == 32
    assert encoder["bert"]["intermediate_size"] == 128
    assert len(encoder["rows"]) == 3 and all(row["tokens"] == 10 for row in encoder["rows"])
    (baseline,) = encoder["baselines"]
    assert baseline.startswith("BertModel")
    assert sum(1 for row in encoder["rows"] if not row["speedup"]) == 1


@pytest.mark.slow
def test_json_file_matches_the_returned_results(tiny_results):
    results, folder = tiny_results
    written = json.loads((folder / "bench.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert {"device", "device_name", "torch", "date", "cpu_threads", "dtype", "fff_backend"} <= set(written["meta"])


@pytest.mark.slow
def test_plot_is_a_png(tiny_results):
    _, folder = tiny_results
    data = (folder / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_table_formatting_marks_baselines_and_ratios():
    rows = bench._rows("layer", 4, {"FFF (x)": [1e-6, 2e-6, 3e-6], "dense a": [4e-6] * 3}, baselines=["dense a"])
    table = bench.format_table(rows, ["dense a"], "tokens")
    assert "2.00x" in table and "1x (baseline)" in table and "2 us" in table


def test_cli_arguments_reach_run_bench(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: seen.update(kwargs) or {})
    assert cli.main(["bench", "--dtype", "bfloat16", "--tokens", "1", "3", "--repeats", "4", "--no-encoder", "--json", str(tmp_path / "r.json")]) == 0
    assert seen["dtype"] == torch.bfloat16 and seen["tokens"] == (1, 3) and seen["repeats"] == 4
    assert seen["encoder"] is False and seen["json_path"] == str(tmp_path / "r.json") and seen["device"] == "cpu"


def test_cli_rejects_bad_arguments_and_missing_devices(capsys):
    assert cli.main(["bench", "--repeats", "0"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda", "--no-encoder"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
