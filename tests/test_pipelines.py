"""pipeline() tasks on saved UltraFastBERT models with a (locally trained) tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline
from transformers.pipelines import SUPPORTED_TASKS

import hf_fff

from _model_helpers import FIXTURES, tiny_config, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(128)


def saved(model_class, tokenizer, tmp_path, **config):
    torch.manual_seed(0)
    model = model_class(tiny_config(vocab_size=len(tokenizer), **config)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_fill_mask(tokenizer, tmp_path):
    fill = pipeline("fill-mask", model=str(saved(hf_fff.UltraFastBertForMaskedLM, tokenizer, tmp_path)), top_k=3)
    assert isinstance(fill.model, hf_fff.UltraFastBertForMaskedLM)
    results = fill("the capital of france is [MASK] .")
    assert len(results) == 3 and all(0 <= r["score"] <= 1 for r in results)
    assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]
    assert all("[MASK]" not in r["sequence"] for r in results)


def test_fill_mask_on_the_published_layout(tokenizer, tmp_path):
    """A crammedBERT folder plus tokenizer files serves pipeline() directly, no conversion step."""
    import shutil

    folder = tmp_path / "crammed"
    shutil.copytree(FIXTURES / "crammed-tiny-1x3", folder)
    tokenizer.save_pretrained(folder)  # 128 < the fixture's vocab of 512: all ids are valid
    fill = pipeline("fill-mask", model=str(folder), top_k=2)
    assert isinstance(fill.model, hf_fff.UltraFastBertForMaskedLM)
    assert len(fill("paris is the [MASK] of france")) == 2


def test_feature_extraction(tokenizer, tmp_path):
    extract = pipeline("feature-extraction", model=str(saved(hf_fff.UltraFastBertModel, tokenizer, tmp_path)))
    features = torch.tensor(extract("the quick brown fox"))
    n_tokens = len(tokenizer("the quick brown fox")["input_ids"])
    assert features.shape == (1, n_tokens, 32) and torch.isfinite(features).all()


def test_text_classification(tokenizer, tmp_path):
    folder = saved(hf_fff.UltraFastBertForSequenceClassification, tokenizer, tmp_path, num_labels=3)
    classify = pipeline("text-classification", model=str(folder), top_k=None)
    scores = classify("the cat sat on the mat")
    scores = scores[0] if isinstance(scores[0], list) else scores  # nested per input in some versions
    assert sorted(s["label"] for s in scores) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-5


def test_token_classification(tokenizer, tmp_path):
    folder = saved(hf_fff.UltraFastBertForTokenClassification, tokenizer, tmp_path, num_labels=2)
    tag = pipeline("token-classification", model=str(folder))
    entities = tag("paris is the capital of france")
    assert entities and all(e["entity"] in ("LABEL_0", "LABEL_1") for e in entities)
    assert all("start" in e and "end" in e for e in entities)


def test_extractive_question_answering_with_a_tokenizer(tokenizer, tmp_path):
    """Tokenizer -> start/end logits -> a span of the context (what the QA pipeline does)."""
    model = hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(saved(hf_fff.UltraFastBertForQuestionAnswering, tokenizer, tmp_path)).eval()
    question, context = "what is the capital of france ?", "the capital of france is paris ."
    encoded = tokenizer(question, context, return_tensors="pt", return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")[0]
    with torch.no_grad():
        out = model(**encoded)
    context_positions = torch.tensor([s == 1 for s in encoded.sequence_ids(0)])
    start = torch.where(context_positions, out.start_logits[0], -torch.inf).argmax()
    end = start + torch.where(context_positions[start:], out.end_logits[0, start:], -torch.inf).argmax()
    answer = context[offsets[start][0] : offsets[end][1]]
    assert answer and answer in context


@pytest.mark.skipif("question-answering" not in SUPPORTED_TASKS, reason="this transformers version removed the question-answering pipeline")
def test_question_answering_pipeline(tokenizer, tmp_path):
    answer = pipeline("question-answering", model=str(saved(hf_fff.UltraFastBertForQuestionAnswering, tokenizer, tmp_path)))
    result = answer(question="what is the capital of france ?", context="the capital of france is paris .")
    assert result["answer"] in "the capital of france is paris ." and 0 <= result["score"] <= 1
