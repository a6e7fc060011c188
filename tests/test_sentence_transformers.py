"""sentence-transformers on native UltraFastBERT folders: the files `hf-fff convert --pooling` writes
(hf_fff.tools.sentence_transformers), encoding through UltraFastBertModel and its FFF op, fine-tuning
with a sentence-transformers loss. Tests that need sentence-transformers skip without it."""

from __future__ import annotations

import json

import pytest
import torch

import hf_fff
import hf_fff_cli as cli
from hf_fff import modeling_ultrafastbert
from hf_fff.tools import sentence_transformers as st_files

from _model_helpers import tiny_config, train_tokenizer

SENTENCES = ["the cat sat on the mat", "paris is the capital of france", "a tree of depth eleven", "the dog"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(128)


@pytest.fixture
def native_folder(tmp_path, tokenizer):
    """A saved random UltraFastBertModel + tokenizer, no sentence-transformers files."""
    torch.manual_seed(0)
    model = hf_fff.UltraFastBertModel(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=64)).eval()
    folder = tmp_path / "native"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def expected_embeddings(folder, tokenizer, pooling: str) -> torch.Tensor:
    """Pooling written out from its definition on UltraFastBertModel's last hidden state."""
    model = hf_fff.UltraFastBertModel.from_pretrained(folder).eval()
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    weights = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def sentence_transformers_or_skip():
    return pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (pip install hf_fff[st])")


# ------------------------------------------------------------------------------- the files themselves


def test_the_files_name_the_modules_and_the_pooling(native_folder):
    written = st_files.write_sentence_transformers_files(native_folder, "mean")
    assert written == ["1_Pooling/config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json"]
    modules = json.loads((native_folder / "modules.json").read_text())
    assert [(m["idx"], m["path"], m["type"]) for m in modules] == [
        (0, "", "sentence_transformers.models.Transformer"),
        (1, "1_Pooling", "sentence_transformers.models.Pooling"),
    ]
    pooling = json.loads((native_folder / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32
    assert [k for k, v in pooling.items() if k.startswith("pooling_mode") and v] == ["pooling_mode_mean_tokens"]
    assert json.loads((native_folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert json.loads((native_folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"


def test_cls_pooling_and_an_explicit_length(native_folder):
    st_files.write_sentence_transformers_files(native_folder, "cls", max_seq_length=32)
    pooling = json.loads((native_folder / "1_Pooling" / "config.json").read_text())
    assert [k for k, v in pooling.items() if k.startswith("pooling_mode") and v] == ["pooling_mode_cls_token"]
    assert json.loads((native_folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 32


def test_no_pooling_writes_nothing(native_folder):
    before = sorted(p.name for p in native_folder.rglob("*"))
    assert st_files.write_sentence_transformers_files(native_folder, "none") == []
    assert sorted(p.name for p in native_folder.rglob("*")) == before


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(pooling="max"), ValueError, "mean, cls, none"),
        (dict(pooling="mean", max_seq_length=0), ValueError, "max_seq_length"),
    ],
)
def test_bad_arguments_are_refused(native_folder, arguments, error, message):
    with pytest.raises(error, match=message):
        st_files.write_sentence_transformers_files(native_folder, **arguments)
    assert not (native_folder / "modules.json").exists()


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        st_files.write_sentence_transformers_files(tmp_path, "mean")


def test_the_cli_offers_the_tools_pooling_modes():
    assert cli.POOLING_MODES == st_files.POOLING_MODES
    args = cli.build_parser().parse_args(["convert", "src", "dst", "--pooling", "mean"])
    assert args.pooling == "mean"
    assert cli.build_parser().parse_args(["convert", "src", "dst"]).pooling == "none"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["convert", "src", "dst", "--pooling", "max"])


# ------------------------------------------------------------------------------- loading and encoding


@pytest.fixture
def fff_calls(monkeypatch):
    """Counts the FFF op calls the model makes (FastFeedForward.forward -> run_fff)."""
    calls = []
    real = modeling_ultrafastbert.run_fff

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_ultrafastbert, "run_fff", counting)
    return calls


def test_a_plain_native_folder_encodes_with_mean_pooling(native_folder, tokenizer, fff_calls):
    sentence_transformers = sentence_transformers_or_skip()
    model = sentence_transformers.SentenceTransformer(str(native_folder), device="cpu")
    assert isinstance(model[0].auto_model, hf_fff.UltraFastBertModel)
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)
    assert len(fff_calls) == 2  # one per layer: the batch went through FastFeedForward
    torch.testing.assert_close(embeddings, expected_embeddings(native_folder, tokenizer, "mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_written_files_load_as_an_embedding_model(native_folder, tokenizer, pooling, tmp_path):
    sentence_transformers = sentence_transformers_or_skip()
    st_files.write_sentence_transformers_files(native_folder, pooling)
    model = sentence_transformers.SentenceTransformer(str(native_folder), device="cpu")
    assert len(model) == 2 and model.max_seq_length == 64
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, expected_embeddings(native_folder, tokenizer, pooling), rtol=1e-5, atol=1e-6)
    # sentence-transformers' own save of what it loaded reloads to the same embeddings
    model.save(str(tmp_path / "resaved"))
    again = sentence_transformers.SentenceTransformer(str(tmp_path / "resaved"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(again, embeddings)


def test_convert_with_pooling_makes_an_embedding_model(crammed_1x3, tmp_path, fff_calls, capsys):
    sentence_transformers = sentence_transformers_or_skip()
    destination = tmp_path / "embedding-model"
    assert cli.main(["convert", str(crammed_1x3), str(destination), "--pooling", "mean"]) == 0
    assert "1_Pooling/config.json" in capsys.readouterr().out
    assert "sentence-transformers" in (destination / "README.md").read_text()
    model = sentence_transformers.SentenceTransformer(str(destination), device="cpu")
    embeddings = model.encode(SENTENCES)
    hidden_size = json.loads((destination / "config.json").read_text())["hidden_size"]
    assert embeddings.shape == (len(SENTENCES), hidden_size) and fff_calls


def test_the_pushed_card_of_an_embedding_folder_carries_the_tags(native_folder):
    from hf_fff.tools.hub import prepare_repo_folder

    st_files.write_sentence_transformers_files(native_folder, "mean")
    files = prepare_repo_folder(native_folder, repo_id="tester/embedding", remote_code=False)
    assert {"modules.json", "1_Pooling/config.json", "README.md"} <= set(files)
    card = (native_folder / "README.md").read_text()
    assert "sentence-transformers" in card and "sentence-similarity" in card


def test_convert_without_pooling_writes_no_sentence_transformers_files(crammed_1x3, tmp_path):
    destination = tmp_path / "plain"
    assert cli.main(["convert", str(crammed_1x3), str(destination)]) == 0
    assert not (destination / "modules.json").exists() and not (destination / "1_Pooling").exists()
    assert "sentence-transformers" not in (destination / "README.md").read_text()


# ------------------------------------------------------------------------------- fine-tuning


def _ranking_loss_class(sentence_transformers):
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss


def test_fine_tuning_with_a_ranking_loss(native_folder):
    """Contrastive fine-tuning (in-batch negatives) of the UltraFastBERT encoder: the loss falls and the FFF
    weights move, through sentence-transformers' loss and the model's own forward/backward."""
    sentence_transformers = sentence_transformers_or_skip()
    st_files.write_sentence_transformers_files(native_folder, "mean")
    model = sentence_transformers.SentenceTransformer(str(native_folder), device="cpu")
    loss_function = _ranking_loss_class(sentence_transformers)(model)
    anchors = ["the cat sat on the mat", "paris is the capital of france", "the quick brown fox", "fast feedforward networks"]
    positives = ["a cat sat on a mat", "the capital of france is paris", "a quick brown fox jumps", "feedforward networks are fast"]
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # renamed in sentence-transformers 6
    fff = model[0].auto_model.encoder.layers[0].ffn
    before = fff.weight_out.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    torch.manual_seed(0)  # dropout
    losses = []
    for _ in range(20):
        loss = loss_function([preprocess(anchors), preprocess(positives)], torch.empty(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(fff.weight_out.detach(), before)
    model.save(str(native_folder / "tuned"))
    reloaded = sentence_transformers.SentenceTransformer(str(native_folder / "tuned"), device="cpu")
    model.eval()
    torch.testing.assert_close(reloaded.encode(anchors, convert_to_tensor=True), model.encode(anchors, convert_to_tensor=True))
