"""Model cards and publishing (hf_fff.tools.hub), against the fake Hub of tests/fake_hub.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import hf_fff  # registers the model type with the Auto classes
from conftest import HUB_TOKEN, HUB_USER
from hf_fff.tools import hub
from hf_fff.tools.hub import HubTokenError, PublishError, push_to_hub, render_bench, render_metrics, render_model_card, split_front_matter

IDS = torch.tensor([[2, 17, 45, 9, 88, 3, 0, 0], [2, 5, 101, 64, 7, 19, 23, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])

BENCH = {
    "device": "cpu (test)",
    "torch": "2.13.0",
    "date": "2026-11-23",
    "results": [
        {"layer": "FFF 1x11", "batch": 1, "seq": 128, "ms": 0.75, "speedup_vs_dense": 31.2},
        {"layer": "dense 3072", "batch": 1, "seq": 128, "ms": 23.4, "speedup_vs_dense": 1.0},
    ],
}


RECORDED_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-amd-epyc-zen5.json"


@pytest.fixture
def bench_json() -> Path:
    """A recorded `hf-fff bench --json` file (benchmarks/results): the publishing tests need one, not a new measurement."""
    return RECORDED_BENCH


@pytest.fixture(scope="module")
def fresh_bench_json(tmp_path_factory) -> Path:
    """A `hf-fff bench --json` file measured now at toy sizes, so the card renders what the current bench writes."""
    from hf_fff.tools import bench

    path = tmp_path_factory.mktemp("bench") / "bench.json"
    bench.run_bench(
        tokens=(1,), repeats=2, hidden=24, depth=3, encoder_batch=2, encoder_seq=5, json_path=str(path),
        model_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300, fff_depth=2),
    )
    return path


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    metadata, _ = split_front_matter(text)
    # The card's YAML must also be what a plain YAML parser reads between the fences.
    raw = text.split("---\n", 2)[1]
    assert yaml.safe_load(raw) == metadata
    return metadata


# ---------------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "architecture, pipeline_tag, auto_class",
    [
        ("UltraFastBertForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
        ("UltraFastBertForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
        ("UltraFastBertForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
        ("UltraFastBertForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
        ("UltraFastBertModel", "feature-extraction", "AutoModel"),
    ],
)
def test_card_metadata_and_usage_per_head(architecture, pipeline_tag, auto_class):
    from hf_fff import UltraFastBertConfig

    config = UltraFastBertConfig(architectures=[architecture], fff_depth=11, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    card = render_model_card(
        config, repo_id="someone/ufb", base_model="pbelcak/UltraFastBERT-1x11-long", license="mit", tags=["glue"], remote_code=True
    )
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == pipeline_tag
    assert metadata["base_model"] == "pbelcak/UltraFastBERT-1x11-long"
    assert metadata["license"] == "mit"
    assert {"ultrafastbert", "glue", "custom_code"} <= set(metadata["tags"])
    assert "{{" not in card and "}}" not in card
    assert f"from transformers import {auto_class}, AutoTokenizer" in card
    assert f'{auto_class}.from_pretrained("someone/ufb").eval()' in card
    assert "import hf_fff" in card
    assert 'trust_remote_code=True' in card
    assert "12 of 4095" in card  # neurons evaluated per token: depth + 1 of 2^(depth+1) - 1
    assert "arxiv.org/abs/2311.10770" in card
    if "Classification" in architecture:
        assert "a, b, c" in card


def test_card_usage_snippet_runs(converted_tiny: Path, tmp_path: Path):
    """The card's loading code is real code: run it against the local folder."""
    import re

    config = json.loads((converted_tiny / "config.json").read_text())
    card = render_model_card(config, repo_id=str(converted_tiny))
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), namespace)  # noqa: S102 - our own generated snippet
    assert namespace["logits"].shape[-1] == config["vocab_size"]


def test_metrics_tables(tmp_path: Path):
    flat = render_metrics({"accuracy": 0.91234, "f1": 0.88, "samples": 872})
    assert "| Metric | Value |" in flat and "| accuracy | 0.9123 |" in flat and "| samples | 872 |" in flat
    grouped = render_metrics({"glue/sst2": {"accuracy": 0.9}, "glue/mrpc": {"f1": 0.85, "accuracy": 0.8}})
    assert "| Task | Metric | Value |" in grouped and "| glue/mrpc | f1 | 0.85 |" in grouped
    trainer_style = tmp_path / "eval_results.json"
    trainer_style.write_text(json.dumps({"eval_accuracy": 0.75, "eval_loss": 0.61, "epoch": 3.0}))
    assert "| eval_accuracy | 0.75 |" in render_metrics(trainer_style)
    assert "No evaluation results" in render_metrics(None)
    with pytest.raises(PublishError, match="not valid JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{accuracy: }")
        render_metrics(bad)
    with pytest.raises(PublishError, match="does not exist"):
        render_metrics(tmp_path / "missing.json")
    with pytest.raises(PublishError, match="list"):
        render_metrics({"accuracy": [1, 2]})


@pytest.mark.slow
def test_bench_json_of_hf_fff_bench_renders_as_tables(fresh_bench_json: Path):
    results = json.loads(fresh_bench_json.read_text())
    section = render_bench(fresh_bench_json)
    assert section.startswith("Measured with `hf-fff bench` on ")
    assert results["meta"]["torch"] in section and results["meta"]["fff_backend"] in section
    layer_header = "| tokens | implementation | median | ns/token | " + " | ".join(f"vs {b}" for b in results["layer"]["baselines"]) + " |"
    assert layer_header in section
    assert "| vs " + results["encoder"]["baselines"][0] + " |" in section
    for row in results["layer"]["rows"] + results["encoder"]["rows"]:
        assert f"| {row['tokens']} | {row['name']} | " in section
    token_counts = {row["tokens"] for row in results["layer"]["rows"]}
    assert section.count("1x (baseline)") == len(results["layer"]["baselines"]) * len(token_counts) + 1
    broken = {**results, "layer": {**results["layer"], "rows": [{"name": "x"}]}}
    with pytest.raises(PublishError, match="malformed row"):
        render_bench(broken)


def test_bench_table(tmp_path: Path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCH))
    table = render_bench(path)
    assert "device: cpu (test)" in table and "torch: 2.13.0" in table
    assert "| layer | batch | seq | ms | speedup_vs_dense |" in table
    assert "| FFF 1x11 | 1 | 128 | 0.75 | 31.2 |" in table
    assert render_bench(BENCH["results"]).count("\n| ") == 3  # header + 2 rows, no environment line
    with pytest.raises(PublishError, match="hf-fff bench --json"):
        render_bench({"device": "cpu"})
    assert "hf-fff bench" in render_bench(None)


def test_ready_card_for_the_published_model_is_current():
    """model_cards/UltraFastBERT-1x11-long.md is what render_model_card produces for the full-size model."""
    from hf_fff.tools.hub import reference_card_for_published_model

    committed = hub.load_template("UltraFastBERT-1x11-long.md")
    recorded_bench = json.loads(RECORDED_BENCH.read_text())
    assert committed == reference_card_for_published_model(bench=recorded_bench)  # speed table: the recorded CPU run
    metadata = front_matter(committed)
    assert metadata["base_model"] == "pbelcak/UltraFastBERT-1x11-long"
    assert metadata["pipeline_tag"] == "fill-mask"
    assert "| Layers | 16 |" in committed and "| Hidden size | 768 |" in committed and "12 of 4095" in committed
    assert "163.7M" in committed  # unique parameters: the tied decoder is stored once


# ---------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------


def test_push_converted_model_and_load_it_back(fake_hub, hub_token, converted_tiny: Path, tmp_path: Path, fresh_hf_cache, bench_json):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"glue/sst2": {"accuracy": 0.873}}))
    bench = bench_json
    report = push_to_hub(converted_tiny, f"{HUB_USER}/ufb-tiny", metrics=metrics, bench=bench)

    assert report.revision == "main" and report.pr_url is None
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "modeling_ultrafastbert.py"} <= set(report.files)
    stored = fake_hub.files(f"{HUB_USER}/ufb-tiny")
    assert set(report.files) <= set(stored)
    if fake_hub.lfs:  # safetensors went through the LFS batch API, as on the real Hub
        assert stored["model.safetensors"].is_lfs
        assert any(path.endswith(".git/info/lfs/objects/batch") for _, path in fake_hub.requests)

    card = fake_hub.file_bytes(f"{HUB_USER}/ufb-tiny", "README.md").decode()
    metadata = front_matter(card)
    assert metadata["pipeline_tag"] == "fill-mask" and "custom_code" in metadata["tags"]
    assert "| glue/sst2 | accuracy | 0.873 |" in card
    assert render_bench(bench_json) in card
    assert 'from_pretrained("tester/ufb-tiny")' in card
    assert "Converted from the published crammedBERT layout" in card  # provenance carried from convert's card

    # Back from the Hub into an empty cache: identical outputs to the local folder.
    assert not fresh_hf_cache.exists()
    local = AutoModelForMaskedLM.from_pretrained(converted_tiny).eval()
    remote = AutoModelForMaskedLM.from_pretrained(f"{HUB_USER}/ufb-tiny").eval()
    # With hf_fff imported, the repo's auto_map does not divert loading to the remote (torch-only) code.
    assert type(remote) is hf_fff.UltraFastBertForMaskedLM
    assert any(fresh_hf_cache.rglob("model.safetensors"))
    assert torch.equal(outputs(local), outputs(remote))
    tokenizer = AutoTokenizer.from_pretrained(f"{HUB_USER}/ufb-tiny")
    assert tokenizer("the quick brown fox")["input_ids"] == AutoTokenizer.from_pretrained(converted_tiny)("the quick brown fox")["input_ids"]

    # Pushing again is idempotent (repo exists) and leaves the user's folder untouched.
    push_to_hub(converted_tiny, f"{HUB_USER}/ufb-tiny", metrics=metrics, bench=bench)
    assert "auto_map" not in json.loads((converted_tiny / "config.json").read_text())
    assert "glue/sst2" not in (converted_tiny / "README.md").read_text()
    assert not (converted_tiny / "modeling_ultrafastbert.py").exists()


def _cli(argv: list[str]) -> int:
    from hf_fff_cli import main

    return main(["push", *argv])


def test_cli_push_private_branch_and_pull_request(lfs_hub, hub_token, converted_tiny: Path, fresh_hf_cache, capsys, monkeypatch, tmp_path, bench_json):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = f"{HUB_USER}/ufb-private"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"eval_accuracy": 0.5}))
    argv = [str(converted_tiny), repo, "--private", "--revision", "dev", "--commit-message", "first upload",
            "--metrics", str(metrics), "--bench", str(bench_json), "--tag", "test-tag"]
    assert _cli(argv) == 0
    out, err = capsys.readouterr()
    assert "dev" in out and HUB_TOKEN not in out + err
    card = lfs_hub.file_bytes(repo, "README.md", revision="dev").decode()
    assert "| eval_accuracy | 0.5 |" in card and render_bench(bench_json) in card
    assert 'from_pretrained("tester/ufb-private", revision="dev")' in card
    assert "test-tag" in front_matter(card)["tags"]

    api = HfApi(token=HUB_TOKEN)
    assert api.model_info(repo).private is True
    assert "model.safetensors" in api.list_repo_files(repo, revision="dev")
    assert "model.safetensors" not in api.list_repo_files(repo)  # main only has the initial commit
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the token
        hf_hub_download(repo, "config.json", revision="dev", token=False)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)

    assert _cli([str(converted_tiny), repo, "--create-pr"]) == 0
    out = capsys.readouterr().out
    assert "pull request" in out and "refs/pr/1" in out
    assert "model.safetensors" in api.list_repo_files(repo, revision="refs/pr/1")
    assert "model.safetensors" not in api.list_repo_files(repo)

    from transformers import AutoModelForMaskedLM

    remote = AutoModelForMaskedLM.from_pretrained(repo, revision="dev")
    assert torch.equal(outputs(remote), outputs(AutoModelForMaskedLM.from_pretrained(converted_tiny)))


def test_push_without_token_fails_clearly(lfs_hub, converted_tiny: Path, capsys):
    with pytest.raises(HubTokenError, match="No Hugging Face token found") as caught:
        push_to_hub(converted_tiny, f"{HUB_USER}/never")
    assert "hf auth login" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert _cli([str(converted_tiny), f"{HUB_USER}/never"]) == 1
    assert "No Hugging Face token found" in capsys.readouterr().err
    assert lfs_hub.requests == []  # refused before any request
    assert lfs_hub.repos == {}


def test_push_with_rejected_token_names_its_source_not_its_value(lfs_hub, converted_tiny: Path, monkeypatch, capsys):
    secret = "hf_not_a_valid_token_42"
    monkeypatch.setenv("HF_TOKEN", secret)
    with pytest.raises(HubTokenError, match="HF_TOKEN environment variable was rejected") as caught:
        push_to_hub(converted_tiny, f"{HUB_USER}/never")
    assert secret not in str(caught.value)
    assert _cli([str(converted_tiny), f"{HUB_USER}/never", "--token", secret]) == 1
    out, err = capsys.readouterr()
    assert "token argument was rejected" in err and secret not in out + err
    assert lfs_hub.repos == {}


def test_push_refuses_what_is_not_a_native_model(lfs_hub, hub_token, crammed_1x3: Path, tmp_path: Path):
    with pytest.raises(PublishError, match="hf-fff convert"):
        push_to_hub(crammed_1x3, f"{HUB_USER}/crammed")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PublishError, match="config.json"):
        push_to_hub(empty, f"{HUB_USER}/empty")
    with pytest.raises(PublishError, match="namespace/name"):
        push_to_hub(empty, "no-namespace")
    with pytest.raises(PublishError, match="pull request"):
        push_to_hub(empty, f"{HUB_USER}/x", create_pr=True, revision="dev")
    assert lfs_hub.repos == {}


def test_push_a_model_object_with_its_tokenizer(lfs_hub, hub_token, converted_tiny: Path, fresh_hf_cache):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(converted_tiny)
    tokenizer = AutoTokenizer.from_pretrained(converted_tiny)
    report = push_to_hub(model, f"{HUB_USER}/from-object", tokenizer=tokenizer, license="mit")
    assert "tokenizer.json" in report.files
    card = lfs_hub.file_bytes(f"{HUB_USER}/from-object", "README.md").decode()
    assert front_matter(card)["license"] == "mit"
    remote = AutoModelForMaskedLM.from_pretrained(f"{HUB_USER}/from-object")
    assert torch.equal(outputs(remote), outputs(model.eval()))


def test_transformers_push_to_hub_gives_a_loadable_repo(lfs_hub, hub_token, converted_tiny: Path, fresh_hf_cache):
    """model.push_to_hub from transformers (no hf_fff code involved in the upload) also works."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(converted_tiny)
    model.push_to_hub(f"{HUB_USER}/via-transformers")
    remote = AutoModelForMaskedLM.from_pretrained(f"{HUB_USER}/via-transformers")
    assert type(remote).__name__ == "UltraFastBertForMaskedLM"
    assert torch.equal(outputs(remote), outputs(model.eval()))


@pytest.mark.slow
def test_trainer_fine_tuned_classifier_publishes_the_same_way(lfs_hub, hub_token, converted_tiny: Path, tmp_path: Path, fresh_hf_cache):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_fff import UltraFastBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(converted_tiny)
    model = UltraFastBertForSequenceClassification.from_pretrained(
        converted_tiny, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    texts = ["the cat sat on the mat", "paris is the capital of france", "the dog slept", "fast feedforward networks"] * 2
    data = [dict(tokenizer(t), labels=i % 2) for i, t in enumerate(texts)]
    out_dir = tmp_path / "trainer-out"
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    assert any(p.name.startswith("checkpoint-") for p in out_dir.iterdir())

    report = push_to_hub(out_dir, f"{HUB_USER}/ufb-classifier", metrics={"accuracy": 0.5}, base_model=f"{HUB_USER}/ufb-tiny")
    assert not any(f.startswith("checkpoint-") for f in report.files)
    card = lfs_hub.file_bytes(f"{HUB_USER}/ufb-classifier", "README.md").decode()
    metadata = front_matter(card)
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["base_model"] == f"{HUB_USER}/ufb-tiny"
    assert "negative, positive" in card and "| accuracy | 0.5 |" in card

    remote = AutoModelForSequenceClassification.from_pretrained(f"{HUB_USER}/ufb-classifier").eval()
    local = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    assert remote.config.id2label == {0: "negative", 1: "positive"}
    assert torch.equal(outputs(remote), outputs(local))
    trained = trainer.model.eval()
    assert torch.equal(outputs(remote), outputs(trained))


def test_keep_card_uploads_the_folders_own_readme(lfs_hub, hub_token, converted_tiny: Path, tmp_path: Path):
    folder = tmp_path / "own-card"
    shutil.copytree(converted_tiny, folder)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n\n# My own words\n")
    push_to_hub(folder, f"{HUB_USER}/own-card", card=False, remote_code=False)
    assert lfs_hub.file_bytes(f"{HUB_USER}/own-card", "README.md").decode().endswith("# My own words\n")
    assert "modeling_ultrafastbert.py" not in lfs_hub.files(f"{HUB_USER}/own-card")


@pytest.mark.slow
def test_console_convert_then_push_in_a_fresh_process(lfs_hub, crammed_1x3: Path, tmp_path: Path, bench_json: Path):
    """The commands as a user runs them: HF_ENDPOINT and HF_TOKEN from the environment, nothing patched."""
    import os
    import subprocess
    import sys

    repo_root = Path(hf_fff.__file__).resolve().parents[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))},
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": lfs_hub.url,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])),
    }

    def hf_fff_cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hf_fff_cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    converted = hf_fff_cli("convert", str(crammed_1x3), "UltraFastBERT-tiny", "--dtype", "bf16")
    assert converted.returncode == 0, converted.stderr
    assert "max relative error" in converted.stdout
    pushed = hf_fff_cli("push", "UltraFastBERT-tiny", f"{HUB_USER}/from-console", "--bench", str(bench_json))
    assert pushed.returncode == 0, pushed.stderr
    assert HUB_TOKEN not in pushed.stdout + pushed.stderr
    assert f"{lfs_hub.url}/{HUB_USER}/from-console" in pushed.stdout
    files = lfs_hub.files(f"{HUB_USER}/from-console")
    assert files["model.safetensors"].is_lfs and "modeling_ultrafastbert.py" in files
    assert render_bench(bench_json) in lfs_hub.file_bytes(f"{HUB_USER}/from-console", "README.md").decode()


# ---------------------------------------------------------------- what push uploads, tokens, clear errors


def _one_line_error(err: str) -> str:
    """The CLI's error: exactly one line on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def littered_folder(converted_tiny: Path, tmp_path: Path) -> Path:
    """A native model folder with what a working directory collects next to the model."""
    folder = tmp_path / "littered"
    shutil.copytree(converted_tiny, folder)
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("SECRET-OUTSIDE")
    (folder / ".env").write_text("HF_TOKEN=SECRET-DOTENV")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("SECRET-GIT")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "notes.txt~").write_text("editor backup")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "extra.pkl").write_bytes(b"pickle")
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(b"old")
    (folder / "secret.txt").symlink_to(outside)
    (folder / "vocab-link.txt").symlink_to(folder / "tokenizer.json")  # inside the folder, but not a model file
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return folder


def test_push_dry_run_lists_uploads_and_skips_without_token_or_network(lfs_hub, littered_folder: Path, capsys):
    assert _cli([str(littered_folder), f"{HUB_USER}/tidy", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "dry run" in out and "model.safetensors" in out and "1_Pooling/config.json" in out
    for skipped, reason in ((".env", "hidden"), (".git/config", "hidden"), ("notes.txt~", "litter"), ("pytorch_model.bin", "pickle"),
                            ("training_args.bin", "training state"), ("checkpoint-500/model.safetensors", "training state"),
                            ("secret.txt", "outside the folder")):
        assert any(skipped in line and reason in line for line in out.splitlines()), (skipped, out)
    assert "SECRET" not in out + err
    assert lfs_hub.requests == [] and lfs_hub.repos == {}


def test_push_uploads_only_what_a_model_repo_is_made_of(lfs_hub, hub_token, littered_folder: Path):
    announced = []
    report = push_to_hub(littered_folder, f"{HUB_USER}/tidy", include=["pytorch_model.bin"], announce=announced.append)
    stored = lfs_hub.files(f"{HUB_USER}/tidy")
    expected = {
        "config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin",
        "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
        "configuration_ultrafastbert.py", "modeling_ultrafastbert.py", "crammed.py", "ops.py",
    }
    uploaded = {path for path in stored if path != ".gitattributes"}  # the fake hub's initial commit
    assert expected <= uploaded and uploaded == set(report.files)
    for never in (".env", ".git/config", ".DS_Store", "notes.txt~", "training_args.bin", "extra.pkl", "secret.txt", "vocab-link.txt",
                  "checkpoint-500/model.safetensors", "__pycache__/x.cpython-311.pyc"):
        assert never not in uploaded
    assert all(b"SECRET" not in lfs_hub.file_bytes(f"{HUB_USER}/tidy", path) for path in uploaded)
    assert len(announced) == 1 and "skipped" in announced[0]  # said before the upload
    assert dict(report.skipped)["extra.pkl"].startswith("pickle")


def test_token_is_stripped_and_a_malformed_token_is_never_printed(lfs_hub, converted_tiny: Path, capsys, monkeypatch):
    assert _cli([str(converted_tiny), f"{HUB_USER}/crlf", "--token", HUB_TOKEN + "\r\n"]) == 0  # a Windows token file
    out, err = capsys.readouterr()
    assert HUB_TOKEN not in out + err

    halves = ("hf_first_half_of_a_secret", "hf_second_half_of_a_secret")
    for malformed in (f"{halves[0]}\n{halves[1]}", f"{halves[0]} {halves[1]}", f"{halves[0]}\x00", f"{halves[0]}é"):
        assert _cli([str(converted_tiny), f"{HUB_USER}/never", "--token", malformed]) == 1
        out, err = capsys.readouterr()
        assert "malformed" in _one_line_error(err)
        assert halves[0] not in out + err and halves[1] not in out + err
    monkeypatch.setenv("HF_TOKEN", f"{halves[0]}\x1b[2J")
    with pytest.raises(HubTokenError, match="HF_TOKEN.*malformed") as caught:
        push_to_hub(converted_tiny, f"{HUB_USER}/never")
    assert halves[0] not in str(caught.value)
    assert f"{HUB_USER}/never" not in lfs_hub.repos


def test_http_client_errors_are_one_line_without_the_token(lfs_hub, hub_token, converted_tiny: Path, capsys, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi

    def failing_upload(self, **kwargs):
        raise httpx2.RemoteProtocolError(f"server disconnected while sending Authorization: Bearer {HUB_TOKEN}")

    monkeypatch.setattr(HfApi, "upload_folder", failing_upload)
    assert _cli([str(converted_tiny), f"{HUB_USER}/broken"]) == 1
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert "server disconnected" in line and "could not be reached" not in line  # the server was reached
    assert HUB_TOKEN not in out + err and "Bearer ***" in err


def _closed_port_endpoint(monkeypatch) -> str:
    import socket

    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    return url


def test_no_network_is_a_clear_error_naming_the_offline_switch(converted_tiny: Path, tmp_path: Path, monkeypatch, capsys, fresh_hf_cache):
    from hf_fff_cli import main

    url = _closed_port_endpoint(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    assert main(["push", str(converted_tiny), f"{HUB_USER}/offline"]) == 1
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert "could not be reached" in line and url in line and "HF_HUB_OFFLINE=1" in line and "--dry-run" in line
    assert HUB_TOKEN not in out + err

    assert main(["convert", f"{HUB_USER}/some-model", str(tmp_path / "dst")]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "could not be reached" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("repo_id", ["tester/bad..name", "tester/-leading", "tester/double--dash", "tester/" + "x" * 100, "a/b/c", "tester/sp ace"])
def test_repo_ids_the_hub_would_reject_are_refused_before_the_token(lfs_hub, converted_tiny: Path, repo_id, capsys):
    with pytest.raises(PublishError, match="repo id|repo_id"):
        push_to_hub(converted_tiny, repo_id)  # no token set: the id is checked first
    assert _cli([str(converted_tiny), repo_id]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "token" not in line.lower()
    assert lfs_hub.requests == []


def test_push_of_a_crammed_folder_names_the_users_folder(lfs_hub, hub_token, crammed_1x3: Path, capsys):
    assert _cli([str(crammed_1x3), f"{HUB_USER}/crammed"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(crammed_1x3) in line and "hf-fff convert" in line and "hf_fff-push-" not in line
    assert lfs_hub.repos == {}


DAMAGED_CONFIGS = {
    "json list": [1, 2],
    "wrong type": {"model_type": "ultrafastbert", "num_hidden_layers": "twelve"},
    "bool layers": {"model_type": "ultrafastbert", "num_hidden_layers": True},
    "millions of layers": {"model_type": "ultrafastbert", "num_hidden_layers": 5_000_000, "hidden_size": 32, "num_attention_heads": 2},
    "crammed without sizes": {"model_type": "crammedBERT", "arch": {"embedding": {"vocab_size": 300}}},
    "crammed millions of layers": {"arch": {"hidden_size": 32, "num_transformer_layers": 5_000_000, "intermed_depth": 3, "intermed_size": 1,
                                            "embedding": {"vocab_size": 300}, "attention": {"num_attention_heads": 2}}},
    "crammed arch list": {"arch": [1, 2]},
}


@pytest.mark.parametrize("name", sorted(DAMAGED_CONFIGS))
def test_damaged_config_is_a_clear_error_before_allocating(lfs_hub, hub_token, converted_tiny: Path, tmp_path: Path, name, capsys):
    from hf_fff_cli import main

    folder = tmp_path / "damaged"
    shutil.copytree(converted_tiny, folder)
    (folder / "config.json").write_text(json.dumps(DAMAGED_CONFIGS[name]))
    for argv in (["convert", str(folder), str(tmp_path / "dst")], ["push", str(folder), f"{HUB_USER}/damaged"], ["demo", "--model", str(folder), "--no-bench"]):
        assert main(argv) == 1, argv
        out, err = capsys.readouterr()
        line = _one_line_error(err)
        assert "error" in line
    assert not (tmp_path / "dst").exists() and lfs_hub.repos == {}
