"""hf_fff.tools.bench at toy sizes: tables, JSON and the PNG come out well-formed (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

import hf_fff_cli as cli
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
    assert seen["encoder_batch"] == 8 and seen["encoder_seq"] == 128
    assert cli.main(["bench", "--encoder-batch", "1", "--encoder-seq", "16"]) == 0
    assert seen["encoder_batch"] == 1 and seen["encoder_seq"] == 16


def test_cli_rejects_bad_arguments_and_missing_devices(capsys):
    assert cli.main(["bench", "--repeats", "0"]) == 2
    assert cli.main(["bench", "--encoder-seq", "0"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda", "--no-encoder"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------ hf-fff bench --train

TINY_TRAIN_MODELS = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300, fff_depth=2, classifier_head_dim=16)


@pytest.fixture(scope="module")
def tiny_train_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_train")
    threads = torch.get_num_threads()
    # One thread: toy ops gain nothing from more, and on a shared machine a second OpenMP thread that
    # waits for a busy core slows each op a hundredfold.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bench, "MIN_SECONDS_PER_ROW", 0.0)  # toy steps: the minimum sample count is enough
            results = bench.run_train_bench(
                repeats=2,
                batches={"seq-cls": (2,), "mlm": (3,)},
                seq=7,
                backward_tokens=(0, 19),
                hidden=24,
                depth=3,
                model_overrides=TINY_TRAIN_MODELS,
                json_path=str(folder / "train.json"),
            )
    finally:
        torch.set_num_threads(threads)
    return results, folder


def test_training_tables_compare_each_task_against_bert_on_the_same_batch(tiny_train_results):
    results, _ = tiny_train_results
    assert [(s["task"], s["batch"], s["seq"]) for s in results["train"]] == [("seq-cls", 2, 7), ("mlm", 3, 7)]
    for setting, head in zip(results["train"], ("ForSequenceClassification", "ForMaskedLM")):
        assert setting["precision"] == "fp32" and setting["optimizer"] == "AdamW (fused=True)"
        (baseline,) = setting["baselines"]
        assert baseline.startswith(f"Bert{head} bert-base")
        names = [row["name"] for row in setting["rows"]]
        if head == "ForMaskedLM":  # the same model with sparse prediction, beside the first row
            assert names.pop(1) == names[0] + " sparse prediction"
        assert len(names) == 3 and names[2] == baseline
        assert names[0].startswith(f"UltraFastBert{head} 1x2") and names[1].endswith(", masked, published)")
        for row in setting["rows"]:
            assert row["group"] == "train" and row["tokens"] == setting["batch"] * setting["seq"]
            assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] and row["samples"] >= 2
            assert row["peak_memory_bytes"] is None  # not measured on the CPU
            assert bool(row["speedup"]) == (row["name"] != baseline)


def test_backward_table_covers_fff_backends_and_dense_baselines(tiny_train_results):
    results, _ = tiny_train_results
    backward = results["backward"]
    assert backward["baselines"] == ["dense 24-96-24 backward", "dense 24-15-24 backward"]
    names = {row["name"] for row in backward["rows"]}
    assert {"FFF backward (reference torch)", "FFF backward (masked, published: dense autograd)", *backward["baselines"]} <= names
    assert len(names) == 5 and sorted({row["tokens"] for row in backward["rows"]}) == [0, 19]
    for row in backward["rows"]:
        assert row["group"] == "backward" and row["median_s"] > 0
        assert set(row["speedup"]) == (set() if row["name"] in backward["baselines"] else set(backward["baselines"]))


def test_training_json_names_the_machine(tiny_train_results):
    results, folder = tiny_train_results
    written = json.loads((folder / "train.json").read_text())
    assert written == json.loads(json.dumps(results))
    meta = written["meta"]
    assert {"device", "device_name", "torch", "date", "cpu_threads", "cpu_isa", "train_precision"} <= set(meta)
    assert meta["device"] == "cpu" and meta["train_precision"] == "fp32" and isinstance(meta["cpu_isa"], list)
    assert set(meta["cpu_isa"]) <= set(bench.ISA_FLAGS)


@pytest.mark.parametrize("task", bench.TRAIN_TASKS)
def test_training_step_updates_every_weight_the_loss_reaches(task):
    ultrafast, _ = bench.build_training_models(task, torch.device("cpu"), TINY_TRAIN_MODELS)
    inputs = bench.training_batch(task, 2, 9, 300, "cpu")
    optimizer = bench.make_optimizer(ultrafast)
    before = {name: p.detach().clone() for name, p in ultrafast.named_parameters()}
    loss = bench.training_step(ultrafast, optimizer, inputs, torch.device("cpu"))()
    assert torch.isfinite(loss)
    ffn = "ultrafastbert.encoder.layers.0.ffn."
    for name in ("weight_in", "bias_in", "weight_out"):
        assert not torch.equal(before[ffn + name], dict(ultrafast.named_parameters())[ffn + name]), name
    assert bench.step_peak_memory(lambda: None, ultrafast, optimizer, torch.device("cpu")) is None


def test_mlm_batch_masks_fifteen_percent_and_labels_only_those():
    inputs = bench.training_batch("mlm", 64, 128, 1000, "cpu", seed=3)
    targets = inputs["labels"] != -100
    assert abs(targets.float().mean().item() - bench.MLM_PROBABILITY) < 0.01
    assert (inputs["input_ids"][targets] == bench.MASK_TOKEN_ID).all()
    assert (inputs["input_ids"][~targets] != bench.MASK_TOKEN_ID).all()
    assert ((inputs["labels"][targets] > bench.MASK_TOKEN_ID) & (inputs["labels"][targets] < 1000)).all()


def test_masked_dense_baseline_computes_the_fff_and_its_gradients():
    from hf_fff.backends import reference

    import _oracle

    x, weight_in, bias_in, weight_out = (t.requires_grad_(True) for t in _oracle.random_layer(23, 13, 2, 3, torch.float64, seed=5))
    y = reference.fff_forward_masked(x, weight_in, bias_in, weight_out, 3)[0]  # what bench --train times as 'masked'
    y_reference, leaves = reference.fff_forward(x.detach(), weight_in.detach(), bias_in.detach(), weight_out.detach(), 3)
    torch.testing.assert_close(y, y_reference, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(y_reference)
    grads = torch.autograd.grad(y, (x, weight_in, bias_in, weight_out), grad_y)
    expected = reference.fff_backward(grad_y, x.detach(), weight_in.detach(), bias_in.detach(), weight_out.detach(), 3, leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_table_shows_peak_memory_when_measured():
    rows = bench._rows("train", 8, {"a": [2.0], "b": [1.0]}, baselines=["b"])
    rows[0].peak_memory_bytes, rows[1].peak_memory_bytes = 3 * 2**20, 2**30
    table = bench.format_table(rows, ["b"], "tokens")
    assert "peak memory" in table and "3 MiB" in table and "1,024 MiB" in table and "0.50x" in table


def test_cli_train_reaches_run_train_bench(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run_train_bench", lambda **kwargs: seen.update(kwargs) or {})
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: pytest.fail("--train ran the inference bench"))
    assert cli.main(["bench", "--train", "--repeats", "3", "--json", str(tmp_path / "t.json")]) == 0
    assert seen == {"device": "cpu", "repeats": 3, "json_path": str(tmp_path / "t.json"), "compile_mode": None}
    assert cli.main(["bench", "--train", "--compile"]) == 0
    assert seen["compile_mode"] == "default"
    assert cli.main(["bench", "--train", "--compile", "reduce-overhead"]) == 0
    assert seen["compile_mode"] == "reduce-overhead"


def test_cli_offers_the_compile_modes_the_bench_runs(capsys):
    with pytest.raises(SystemExit) as refused:
        cli.main(["bench", "--train", "--compile", "fastest"])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "invalid choice: 'fastest'" in message
    for mode in bench.COMPILE_MODES:
        assert mode in message
    with pytest.raises(ValueError, match="compile mode 'fastest'"):
        bench.compiled_training_step(torch.nn.Linear(1, 1), None, {}, torch.device("cpu"), "x", fullgraph=True, mode="fastest")


def test_cli_compile_without_train_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: pytest.fail("the inference bench ran"))
    assert cli.main(["bench", "--compile"]) == 2
    assert "--compile applies to --train only" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_rows_sit_beside_eager_ones_with_both_baselines(monkeypatch, mode):
    """--compile adds UltraFastBERT and BERT under torch.compile (fullgraph for ours) to the same table; every
    non-baseline row is compared with BERT in both modes."""
    monkeypatch.setattr(bench, "MIN_SECONDS_PER_ROW", 0.0)
    results = bench.run_train_bench(
        repeats=2, batches={"seq-cls": (2,)}, seq=5, backward_tokens=(), model_overrides=TINY_TRAIN_MODELS, compile_mode=mode
    )
    assert "backward" not in results  # no backward sizes asked for: no empty table
    (setting,) = results["train"]
    assert setting["compiled"] is True and setting["compile_mode"] == mode
    eager_bert, compiled_bert = setting["baselines"]
    suffix = " compiled" if mode == "default" else f" compiled {mode}"
    assert compiled_bert == eager_bert + suffix
    names = [row["name"] for row in setting["rows"]]
    assert len(names) == 5 and names[3].startswith("UltraFastBertForSequenceClassification") and names[3].endswith(suffix)
    assert names[4] == compiled_bert
    for row in setting["rows"]:
        assert row["median_s"] > 0
        if row["name"] not in (eager_bert, compiled_bert):
            assert set(row["speedup"]) == {eager_bert, compiled_bert}
