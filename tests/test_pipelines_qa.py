"""The `extractive-question-answering` pipeline (hf_fff.pipelines) on UltraFastBERT and on BERT.

Answers are checked against a brute-force float64 oracle written here from the definition (softmax over
the context tokens, every span scored P(start) * P(end)), and end to end on a tiny UltraFastBERT
fine-tuned on a synthetic task whose answers are known.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerLegacy, pipeline

import hf_fff
from hf_fff import pipelines as qa_pipelines
from hf_fff.tools.demo import train_wordpiece_tokenizer

from _model_helpers import tiny_config, train_tokenizer

TASK = "extractive-question-answering"
QUESTION = "what is the capital of france ?"
CONTEXT = "the capital of france is paris and berlin is the capital of germany ."


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(128)


def _save(model, tokenizer, folder):
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["ultrafastbert", "bert"])
def qa_folder(request, tokenizer, tmp_path_factory):
    """A saved random QA model + tokenizer: UltraFastBERT, and transformers' own BERT."""
    torch.manual_seed(0)
    if request.param == "ultrafastbert":
        model = hf_fff.UltraFastBertForQuestionAnswering(tiny_config(vocab_size=len(tokenizer)))
    else:
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        model = BertForQuestionAnswering(config)
    return _save(model, tokenizer, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def answerer(qa_folder):
    return pipeline(TASK, model=qa_folder)


def oracle_answers(model, tokenizer, question, context, max_answer_len, null=False):
    """Every answer of a one-chunk input with its score, best first, straight from the definition (float64)."""
    encoded = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoded.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        output = model(**encoded)
    in_context = torch.tensor([s == 1 for s in encoded.sequence_ids(0)])
    allowed = in_context.clone()
    allowed[0] = null  # [CLS] stands for "no answer"
    start = torch.where(allowed, output.start_logits[0].double(), -torch.inf).softmax(-1)
    end = torch.where(allowed, output.end_logits[0].double(), -torch.inf).softmax(-1)
    answers = []
    for i in range(len(offsets)):
        for j in range(i, min(i + max_answer_len, len(offsets))):
            if in_context[i] and in_context[j]:
                a, b = offsets[i][0], offsets[j][1]
                answers.append({"score": float(start[i] * end[j]), "start": a, "end": b, "answer": context[a:b]})
    if null:
        answers.append({"score": float(start[0] * end[0]), "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda answer: -answer["score"])


def assert_same_answers(got, expected, rel=1e-6):
    assert [(g["start"], g["end"], g["answer"]) for g in got] == [(e["start"], e["end"], e["answer"]) for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], rel=rel)


# ---------------------------------------------------------------------------------------- registration


def test_the_task_is_registered_at_import():
    from transformers.pipelines import PIPELINE_REGISTRY

    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    _, entry, _ = PIPELINE_REGISTRY.check_task(TASK)
    assert entry["impl"] is hf_fff.ExtractiveQuestionAnsweringPipeline


def test_registering_again_keeps_one_entry_of_ours():
    from transformers.pipelines import PIPELINE_REGISTRY

    before = dict(PIPELINE_REGISTRY.supported_tasks)
    tasks = qa_pipelines.register_pipelines()
    assert tasks[0] == TASK and PIPELINE_REGISTRY.supported_tasks.keys() == before.keys()
    assert PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] is qa_pipelines.ExtractiveQuestionAnsweringPipeline


def test_transformers_own_question_answering_is_left_alone():
    """transformers < 5.3 ships `question-answering`: both names work, the old one stays transformers'."""
    from transformers.pipelines.base import PipelineRegistry

    theirs = {"impl": object, "pt": (), "type": "text"}
    registry = PipelineRegistry(supported_tasks={"question-answering": theirs}, task_aliases={})
    assert qa_pipelines.register_pipelines(registry, removed_tasks={}) == [TASK]
    assert registry.supported_tasks["question-answering"] is theirs
    assert registry.supported_tasks[TASK]["impl"] is qa_pipelines.ExtractiveQuestionAnsweringPipeline


def test_a_rejected_legacy_name_is_not_registered():
    from transformers.pipelines.base import PipelineRegistry

    registry = PipelineRegistry(supported_tasks={}, task_aliases={})
    assert qa_pipelines.register_pipelines(registry, removed_tasks={"question-answering": "gone"}) == [TASK]
    assert "question-answering" not in registry.supported_tasks


def test_both_names_answer_where_the_legacy_name_is_free(monkeypatch, qa_folder):
    """A transformers that accepts `question-answering` but has no pipeline for it gets ours under both names."""
    import transformers.pipelines as transformers_pipelines

    monkeypatch.setattr(transformers_pipelines, "REMOVED_TASKS", {}, raising=False)
    monkeypatch.delitem(transformers_pipelines.PIPELINE_REGISTRY.supported_tasks, "question-answering", raising=False)
    try:
        assert qa_pipelines.register_pipelines() == [TASK, "question-answering"]
        legacy, current = pipeline("question-answering", model=qa_folder), pipeline(TASK, model=qa_folder)
        assert type(legacy) is type(current) is qa_pipelines.ExtractiveQuestionAnsweringPipeline
        assert legacy(question=QUESTION, context=CONTEXT) == current(question=QUESTION, context=CONTEXT)
    finally:
        transformers_pipelines.PIPELINE_REGISTRY.supported_tasks.pop("question-answering", None)


@pytest.mark.skipif("question-answering" not in getattr(__import__("transformers.pipelines").pipelines, "REMOVED_TASKS", {}), reason="this transformers still ships question-answering")
def test_this_transformers_rejects_the_old_name(qa_folder):
    with pytest.raises(KeyError, match="removed"):
        pipeline("question-answering", model=qa_folder)


# ---------------------------------------------------------------------------------------- answers


def test_answers_match_the_oracle(answerer):
    got = answerer(question=QUESTION, context=CONTEXT, top_k=5, max_answer_len=4, align_to_words=False)
    expected = oracle_answers(answerer.model, answerer.tokenizer, QUESTION, CONTEXT, max_answer_len=4)
    assert_same_answers(got, expected[:5])
    for answer in got:
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"] and 0 < answer["score"] < 1


def test_every_span_is_a_probability_and_they_sum_to_at_most_one(answerer):
    """With max_answer_len covering the context, the spans' scores are P(start) * P(end) over start <= end: the
    full table would sum to 1, and the end-before-start pairs are excluded."""
    n_tokens = len(answerer.tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    got = answerer(question=QUESTION, context=CONTEXT, top_k=10_000, max_answer_len=n_tokens, align_to_words=False)
    assert len(got) == n_tokens * (n_tokens + 1) // 2  # fewer than top_k: all there are
    assert 0 < sum(a["score"] for a in got) <= 1 + 1e-9


def test_no_answer_competes_when_asked(answerer):
    got = answerer(question=QUESTION, context=CONTEXT, top_k=4, max_answer_len=3, handle_impossible_answer=True, align_to_words=False)
    expected = oracle_answers(answerer.model, answerer.tokenizer, QUESTION, CONTEXT, max_answer_len=3, null=True)
    assert_same_answers(got, expected[:4])
    null = [a for a in expected if a["answer"] == ""][0]
    everything = answerer(question=QUESTION, context=CONTEXT, top_k=10_000, max_answer_len=3, handle_impossible_answer=True)
    assert {"score": pytest.approx(null["score"]), "start": 0, "end": 0, "answer": ""} in everything


def test_top_k_one_returns_a_dict_and_more_a_list(answerer):
    one = answerer(question=QUESTION, context=CONTEXT)
    assert isinstance(one, dict) and set(one) == {"score", "start", "end", "answer"}
    several = answerer(question=QUESTION, context=CONTEXT, top_k=3)
    assert isinstance(several, list) and len(several) == 3 and several[0] == one
    assert several[0]["score"] >= several[1]["score"] >= several[2]["score"]


def test_answers_are_widened_to_whole_words(answerer):
    context = "the dog slept while the cat jumps over the lazy fox"
    for answer in answerer(question="who slept ?", context=context, top_k=20):
        a, b = answer["start"], answer["end"]
        assert context[a:b] == answer["answer"]
        assert (a == 0 or context[a - 1] == " ") and (b == len(context) or context[b] == " ")


# ---------------------------------------------------------------------------------------- call forms, batches


def test_call_forms_agree(answerer):
    expected = answerer(question=QUESTION, context=CONTEXT)
    assert answerer({"question": QUESTION, "context": CONTEXT}) == expected
    assert answerer(QUESTION, CONTEXT) == expected
    assert answerer([{"question": QUESTION, "context": CONTEXT}]) == [expected]
    assert answerer(question=[QUESTION, QUESTION], context=CONTEXT) == [expected, expected]
    assert answerer(question=QUESTION, context=[CONTEXT]) == [expected]
    assert list(answerer(({"question": QUESTION, "context": CONTEXT} for _ in range(2)))) == [expected, expected]
    assert answerer([]) == [] and answerer(question=[], context=[], batch_size=2) == []


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batches_give_the_unbatched_answers(answerer, batch_size):
    long_context = " ".join([CONTEXT] * 6)
    examples = [
        {"question": QUESTION, "context": CONTEXT},
        {"question": "which city ?", "context": long_context},
        {"question": "what is it", "context": "paris"},
        {"question": QUESTION, "context": "berlin is the capital of germany ."},
    ]
    options = dict(top_k=3, max_seq_len=32, doc_stride=8)
    one_by_one = [answerer(example, **options) for example in examples]
    batched = answerer(examples, batch_size=batch_size, **options)
    assert len(batched) == len(examples)
    for got, expected in zip(batched, one_by_one):
        assert_same_answers(got, expected, rel=1e-4)


def test_a_long_context_is_split_with_a_stride(answerer):
    long_context = " ".join(f"{CONTEXT}" for _ in range(8))
    chunks = list(answerer.preprocess({"question": QUESTION, "context": long_context}, max_seq_len=40, doc_stride=10))
    assert len(chunks) > 3 and [c["is_last"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c["input_ids"].shape[1] <= 40 for c in chunks)
    # Neighbouring chunks share doc_stride context tokens.
    first, second = (c["input_ids"][0][torch.tensor(c["context_mask"])].tolist() for c in chunks[:2])
    assert first[-10:] == second[:10]
    answers = answerer(question=QUESTION, context=long_context, top_k=5, max_seq_len=40, doc_stride=10)
    assert len(answers) == 5 and len({(a["start"], a["end"]) for a in answers}) == 5
    assert all(long_context[a["start"] : a["end"]] == a["answer"] and 0 < a["score"] < 1 for a in answers)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k="3"), "top_k"),
        (dict(max_answer_len=0), "max_answer_len"),
        (dict(max_seq_len=-1), "max_seq_len"),
        (dict(doc_stride=-2), "doc_stride"),
    ],
)
def test_bad_parameters_are_refused(answerer, options, message):
    with pytest.raises(ValueError, match=message):
        answerer(question=QUESTION, context=CONTEXT, **options)


def test_an_unknown_parameter_is_refused(answerer):
    with pytest.raises(TypeError, match="topk"):
        answerer(question=QUESTION, context=CONTEXT, topk=2)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p: p(question=QUESTION, context=""), ValueError, "context is empty"),
        (lambda p: p(question="  ", context=CONTEXT), ValueError, "question is empty"),
        (lambda p: p(question=[QUESTION] * 2, context=[CONTEXT] * 3), ValueError, "2 questions for 3 contexts"),
        (lambda p: p(question=QUESTION), ValueError, "together"),
        (lambda p: p({"question": QUESTION}), ValueError, "context"),
        (lambda p: p({"question": QUESTION, "context": 3}), TypeError, "strings"),
        (lambda p: p(42), TypeError, "int"),
    ],
)
def test_bad_inputs_are_refused(answerer, call, error, message):
    with pytest.raises(error, match=message):
        call(answerer)


def test_a_question_that_leaves_no_room_is_refused(answerer):
    with pytest.raises(ValueError, match="doc_stride"):
        answerer(question=" ".join(["paris"] * 30), context=CONTEXT, max_seq_len=32, doc_stride=8)


def test_a_slow_tokenizer_is_refused_with_a_reason(tmp_path, tokenizer):
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))
    assert not slow.is_fast
    model = hf_fff.UltraFastBertForQuestionAnswering(tiny_config(vocab_size=len(tokenizer))).eval()
    answerer = pipeline(TASK, model=model, tokenizer=slow)
    with pytest.raises(ValueError, match="fast"):
        answerer(question=QUESTION, context=CONTEXT)


# ---------------------------------------------------------------------------------------- a model that knows

CODES = ("red", "blue", "green", "white", "gold", "pink", "grey", "brown")
FILLER = "the cat sat on a mat and dog ran to park while bird sang in tree".split()
CODE_QUESTION = "what is the code ?"


def coded_context(code: str, rng: random.Random) -> str:
    """'<filler> the code is CODE . <filler>', the answer at a varying place."""
    before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 12)))
    after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 12)))
    return f"{before} the code is {code} . {after}".strip()


def fine_tune_code_reader(steps: int = 60, batch: int = 16):
    """A tiny UltraFastBERT trained on CPU to answer CODE_QUESTION; returns (model, tokenizer)."""
    rng = random.Random(0)
    torch.manual_seed(0)
    corpus = [coded_context(code, rng) for code in CODES for _ in range(5)] + [CODE_QUESTION]
    tokenizer = train_wordpiece_tokenizer(corpus * 2, 128)  # room for every word of the corpus whole
    assert all(len(tokenizer.tokenize(code)) == 1 for code in CODES), "each code must be one token"
    config = tiny_config(vocab_size=len(tokenizer), hidden_size=48, num_attention_heads=4, fff_depth=2, fff_trees=2)
    model = hf_fff.UltraFastBertForQuestionAnswering(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        codes = [rng.choice(CODES) for _ in range(batch)]
        contexts = [coded_context(code, rng) for code in codes]
        encoded = tokenizer([CODE_QUESTION] * batch, contexts, padding=True, return_tensors="pt")
        answer_chars = [context.index(f" is {code} .") + 4 for context, code in zip(contexts, codes)]
        positions = torch.tensor([encoded.char_to_token(i, char, sequence_index=1) for i, char in enumerate(answer_chars)])
        loss = model(**encoded, start_positions=positions, end_positions=positions).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, loss.item()


@pytest.fixture(scope="module")
def code_reader(tmp_path_factory):
    model, tokenizer, final_loss = fine_tune_code_reader()
    assert final_loss < 0.1, f"fine-tuning did not converge (loss {final_loss:.3f})"
    return pipeline(TASK, model=_save(model, tokenizer, tmp_path_factory.mktemp("code-reader")))


def test_a_fine_tuned_model_finds_the_known_answer(code_reader):
    rng = random.Random(123)  # contexts never seen in training
    for _ in range(12):
        code = rng.choice(CODES)
        context = coded_context(code, rng)
        answer = code_reader(question=CODE_QUESTION, context=context)
        assert answer["answer"] == code and context[answer["start"] : answer["end"]] == code
        assert answer["score"] > 0.5


def test_a_fine_tuned_model_finds_the_answer_in_a_late_chunk(code_reader):
    rng = random.Random(7)
    filler = " ".join(rng.choice(FILLER) for _ in range(60))
    context = f"{filler} the code is gold . {filler}"
    chunks = list(code_reader.preprocess({"question": CODE_QUESTION, "context": context}, max_seq_len=32, doc_stride=8))
    assert len(chunks) > 4
    answer = code_reader(question=CODE_QUESTION, context=context, max_seq_len=32, doc_stride=8)
    assert answer["answer"] == "gold" and context[answer["start"] : answer["end"]] == "gold"
    assert answer["start"] == context.index(" is gold") + 4


def test_a_fine_tuned_model_answers_a_batch(code_reader):
    rng = random.Random(11)
    codes = [rng.choice(CODES) for _ in range(6)]
    contexts = [coded_context(code, rng) for code in codes]
    answers = code_reader(question=CODE_QUESTION, context=contexts, batch_size=4)
    assert [a["answer"] for a in answers] == codes
