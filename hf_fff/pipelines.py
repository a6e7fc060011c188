"""Extractive question answering as a transformers pipeline, for any AutoModelForQuestionAnswering model.

transformers 5.3 removed the `question-answering` pipeline and rejects that task name before its
registry is consulted, so hf_fff registers this one as `extractive-question-answering` (at
`import hf_fff`):

    import hf_fff
    from transformers import pipeline
    answer = pipeline("extractive-question-answering", model="path/or/hub-id")
    answer(question="what is the code ?", context="the code is blue .")
    # {'score': 0.93, 'start': 12, 'end': 16, 'answer': 'blue'}

How an answer is found: the (question, context) pair is tokenized with a fast tokenizer; a context longer
than `max_seq_len` is split into overlapping chunks (`doc_stride` tokens shared by neighbours). Per chunk,
start and end logits are turned into probabilities by a softmax over the context tokens (plus the CLS
token when `handle_impossible_answer`), a span's score is P(start) * P(end) with start <= end <
start + max_answer_len, and the best spans over all chunks are mapped back to character offsets
through the tokenizer's offset mapping, so `context[start:end] == answer`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from transformers.pipelines.base import ChunkPipeline


TASK = "extractive-question-answering"
LEGACY_TASK = "question-answering"  # served by transformers itself where it still ships it (< 5.3)

# Per chunk, what preprocess hands through the model call to postprocess untouched.
_CHUNK_METADATA = ("start_chars", "end_chars", "context_mask", "cls_index", "n_tokens", "example", "is_last")
_DEFAULT_MAX_SEQ_LEN = 384
_DEFAULT_MAX_DOC_STRIDE = 128


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_example(example: Any) -> dict[str, str]:
    if not isinstance(example, dict) or "question" not in example or "context" not in example:
        raise ValueError(f'each input must be a dict with "question" and "context" keys, got {example!r}')
    question, context = example["question"], example["context"]
    if not isinstance(question, str) or not isinstance(context, str):
        raise TypeError(f"question and context must be strings, got {type(question).__name__} and {type(context).__name__}")
    if not question.strip():
        raise ValueError("the question is empty")
    if not context.strip():
        raise ValueError("the context is empty: there is nothing to extract an answer from")
    return example


def _as_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def examples_from_arguments(args: tuple, question: Any = None, context: Any = None):
    """Normalize the accepted call forms into one {"question", "context"} dict or a list (or stream) of them.

    pipe(question=..., context=...) with strings or lists (a single string is repeated against a list),
    pipe({"question": ..., "context": ...}), pipe([dict, ...]), pipe(generator or Dataset of dicts),
    pipe("question", "context").
    """
    if question is not None or context is not None:
        if args:
            raise TypeError("pass the inputs either positionally or as question=/context=, not both")
        if question is None or context is None:
            raise ValueError("question= and context= must be given together")
        if isinstance(question, str) and isinstance(context, str):
            return {"question": question, "context": context}
        questions, contexts = _as_list(question, "question"), _as_list(context, "context")
        if len(questions) == 1 and len(contexts) > 1:
            questions = questions * len(contexts)
        elif len(contexts) == 1 and len(questions) > 1:
            contexts = contexts * len(questions)
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(questions)} questions for {len(contexts)} contexts")
        return [{"question": q, "context": c} for q, c in zip(questions, contexts)]
    if len(args) == 2 and all(isinstance(a, str) for a in args):
        return {"question": args[0], "context": args[1]}
    if len(args) != 1:
        raise TypeError("expected question=/context=, one {'question', 'context'} dict, a list of them, or (question, context)")
    inputs = args[0]
    if isinstance(inputs, dict):
        return _check_example(inputs)
    if isinstance(inputs, (list, tuple)):
        return [_check_example(example) for example in inputs]
    if isinstance(inputs, Iterable) and not isinstance(inputs, str):
        return inputs  # streamed: each item is checked when it is preprocessed
    raise TypeError(f"cannot read a question and a context from {type(inputs).__name__}")


def ranked_spans(start_probs: torch.Tensor, end_probs: torch.Tensor, context_mask: torch.Tensor, max_answer_len: int):
    """Every token span allowed as an answer, best first: (scores, starts, ends), score = P(start) * P(end).

    start_probs, end_probs (L,) probabilities; context_mask (L,) bool. A span needs both ends in the
    context, end >= start and end - start < max_answer_len: at most L * max_answer_len spans.
    """
    length = start_probs.shape[0]
    positions = torch.arange(length)
    width = positions[None, :] - positions[:, None]  # (L start, L end)
    valid = context_mask[:, None] & context_mask[None, :] & (width >= 0) & (width < max_answer_len)
    starts, ends = valid.nonzero(as_tuple=True)
    scores = start_probs[starts] * end_probs[ends]
    order = torch.argsort(scores, descending=True, stable=True)
    return scores[order], starts[order], ends[order]


def _token_char_bounds(encoded, chunk: int, context_sequence: int, align_to_words: bool) -> tuple[list[int], list[int]]:
    """Per token of one chunk, the context character where an answer starting (ending) there starts (ends).

    The token's own offsets, or with align_to_words those of the whole word it belongs to. Tokens outside
    the context get their offsets too; they are never picked as span ends.
    """
    offsets = encoded["offset_mapping"][chunk]
    starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]
    if align_to_words:
        for position, (sequence, word) in enumerate(zip(encoded.sequence_ids(chunk), encoded.word_ids(chunk))):
            if sequence == context_sequence and word is not None:
                starts[position], ends[position] = encoded.word_to_chars(chunk, word, sequence_index=context_sequence)
    return starts, ends


class ExtractiveQuestionAnsweringPipeline(ChunkPipeline):
    """Extractive QA: the span of the context that answers the question, for any question-answering model.

    Call forms: `pipe(question=..., context=...)` (strings or lists), `pipe({"question": ..., "context": ...})`,
    `pipe([dict, ...])`, `pipe("question", "context")`; lists and datasets are batched with `batch_size=`.

    Parameters (at construction or per call):
        top_k (default 1): answers per input; 1 returns a dict, more a list of dicts (best first; fewer
            if the context has fewer possible spans).
        max_answer_len (default 15): longest answer, in tokens.
        handle_impossible_answer (default False): also consider "no answer" (the CLS token), returned as
            {"answer": "", "start": 0, "end": 0} when it scores best.
        align_to_words (default True): widen answers to whole words (a subword span "pt" of "slept" becomes
            "slept"); the tokenizer's word boundaries decide.
        max_seq_len (default min(384, tokenizer.model_max_length)): tokens per chunk, question included.
        doc_stride (default min(max_seq_len // 2, 128)): tokens shared by neighbouring chunks.

    Each answer is {"score", "start", "end", "answer"} with context[start:end] == answer and score a
    probability, P(start) * P(end) within the chunk it came from.
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _non_generation_params = ("top_k",)

    def __call__(self, *args, question: Any = None, context: Any = None, **kwargs):
        examples = examples_from_arguments(args, question, context)
        if isinstance(examples, list) and not examples:
            # still refuse bad parameters (batch_size and num_workers belong to Pipeline.__call__)
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []  # Pipeline.__call__ peeks at the first input
        return super().__call__(examples, **kwargs)

    def _sanitize_parameters(
        self,
        top_k: Optional[int] = None,
        max_answer_len: Optional[int] = None,
        handle_impossible_answer: Optional[bool] = None,
        max_seq_len: Optional[int] = None,
        doc_stride: Optional[int] = None,
        align_to_words: Optional[bool] = None,
        **unknown,
    ):
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected parameters: {', '.join(sorted(unknown))}")
        preprocess_params: dict[str, Any] = {}
        if max_seq_len is not None:
            preprocess_params["max_seq_len"] = _check_positive_int("max_seq_len", max_seq_len)
        if doc_stride is not None:
            if isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or doc_stride < 0:
                raise ValueError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
            preprocess_params["doc_stride"] = doc_stride
        if align_to_words is not None:
            preprocess_params["align_to_words"] = bool(align_to_words)
        postprocess_params: dict[str, Any] = {}
        if top_k is not None:
            postprocess_params["top_k"] = _check_positive_int("top_k", top_k)
        if max_answer_len is not None:
            postprocess_params["max_answer_len"] = _check_positive_int("max_answer_len", max_answer_len)
        if handle_impossible_answer is not None:
            postprocess_params["handle_impossible_answer"] = bool(handle_impossible_answer)
        return preprocess_params, {}, postprocess_params

    def _check_tokenizer(self) -> None:
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            name = type(self.tokenizer).__name__ if self.tokenizer is not None else "no tokenizer"
            raise ValueError(
                f"{TASK} needs a fast (Rust `tokenizers`) tokenizer for its offset mapping and overflowing chunks, "
                f"got {name}; load one with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )

    def _default_max_seq_len(self) -> int:
        return min(_DEFAULT_MAX_SEQ_LEN, int(self.tokenizer.model_max_length))

    def preprocess(self, example, max_seq_len: Optional[int] = None, doc_stride: Optional[int] = None, align_to_words: bool = True):
        self._check_tokenizer()
        example = _check_example(example)
        max_seq_len = max_seq_len or self._default_max_seq_len()
        doc_stride = min(max_seq_len // 2, _DEFAULT_MAX_DOC_STRIDE) if doc_stride is None else doc_stride
        # Leading spaces become empty tokens with some tokenizers; the question's offsets are never used.
        question, context = example["question"].lstrip(), example["context"]
        self._check_room(question, max_seq_len, doc_stride)
        # Models padded on the left (XLNet-style) read the context first.
        question_first = self.tokenizer.padding_side == "right"
        encoded = self.tokenizer(
            text=question if question_first else context,
            text_pair=context if question_first else question,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        context_sequence = 1 if question_first else 0
        n_chunks = len(encoded["input_ids"])
        for i in range(n_chunks):
            input_ids = encoded["input_ids"][i]
            context_mask = [s == context_sequence for s in encoded.sequence_ids(i)]
            if not any(context_mask):
                raise ValueError(f"the context {context[:50]!r} produced no tokens")
            chunk = {name: torch.tensor([encoded[name][i]]) for name in self.tokenizer.model_input_names if name in encoded}
            cls_id = self.tokenizer.cls_token_id
            start_chars, end_chars = _token_char_bounds(encoded, i, context_sequence, align_to_words)
            chunk.update(
                start_chars=start_chars,
                end_chars=end_chars,
                context_mask=context_mask,
                # "No answer" points at CLS (BERT's SQuAD 2.0 convention); the first token if there is none.
                cls_index=input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0,
                n_tokens=len(input_ids),
                example=example,
                is_last=i == n_chunks - 1,
            )
            yield chunk

    def _check_room(self, question: str, max_seq_len: int, doc_stride: int) -> None:
        question_tokens = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        room = max_seq_len - question_tokens - self.tokenizer.num_special_tokens_to_add(pair=True)
        if room <= doc_stride:
            raise ValueError(
                f"with max_seq_len={max_seq_len} the question ({question_tokens} tokens) leaves {room} tokens per chunk "
                f"for the context, which must exceed doc_stride={doc_stride}: raise max_seq_len, lower doc_stride "
                f"or shorten the question"
            )

    def _forward(self, inputs):
        model_inputs = {name: inputs[name] for name in self.tokenizer.model_input_names if name in inputs}
        output = self.model(**model_inputs)
        # output[0], output[1]: start and end logits, for a ModelOutput and for return_dict=False alike
        return {"start_logits": output[0], "end_logits": output[1], **{name: inputs[name] for name in _CHUNK_METADATA}}

    def _real_tokens(self, logits: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """(1, L_padded) logits of a batched chunk -> (n_tokens,) float64 of its own tokens."""
        logits = logits.reshape(-1).double()
        return logits[-n_tokens:] if self.tokenizer.padding_side == "left" else logits[:n_tokens]

    def postprocess(self, chunks, top_k: int = 1, max_answer_len: int = 15, handle_impossible_answer: bool = False):
        context = chunks[0]["example"]["context"]
        best: dict[tuple[int, int], float] = {}  # (start char, end char) -> best score over chunks
        null_score = None
        for chunk in chunks:
            context_mask = torch.tensor(chunk["context_mask"])
            allowed = context_mask.clone()
            if handle_impossible_answer:
                allowed[chunk["cls_index"]] = True
            probs = []
            for name in ("start_logits", "end_logits"):
                logits = self._real_tokens(chunk[name], chunk["n_tokens"])
                probs.append(torch.where(allowed, logits, -torch.inf).softmax(-1))
            start_probs, end_probs = probs
            if handle_impossible_answer:
                cls = chunk["cls_index"]
                # "No answer" must hold for the whole context: the least confident chunk decides.
                chunk_null = float(start_probs[cls] * end_probs[cls])
                null_score = chunk_null if null_score is None else min(null_score, chunk_null)
            _add_best_spans(best, chunk, ranked_spans(start_probs, end_probs, context_mask, max_answer_len), top_k)
        answers = [{"score": s, "start": a, "end": b, "answer": context[a:b]} for (a, b), s in best.items()]
        if null_score is not None:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
        return answers[0] if top_k == 1 else answers


def _add_best_spans(best: dict[tuple[int, int], float], chunk: dict, spans, top_k: int) -> None:
    """Fold a chunk's top_k distinct character spans into `best` (several token spans can map to one
    character span with align_to_words, and neighbouring chunks overlap), keeping each span's best score."""
    seen = set()
    for score, start, end in zip(*(t.tolist() for t in spans)):
        span = (chunk["start_chars"][start], chunk["end_chars"][end])
        if span in seen:
            continue
        seen.add(span)
        best[span] = max(score, best.get(span, 0.0))
        if len(seen) == top_k:
            return


def _owned_by_hf_fff(registry, task: str) -> bool:
    impl = registry.supported_tasks.get(task, {}).get("impl")
    return getattr(impl, "__module__", None) == __name__


def register_pipelines(registry=None, removed_tasks=None) -> list[str]:
    """Register the pipeline with transformers' PIPELINE_REGISTRY; returns the task names it serves.

    `extractive-question-answering` always. `question-answering` only where transformers neither
    serves it itself (< 5.3 still does: both names then work, the old one with transformers' pipeline)
    nor rejects the name outright (>= 5.3 does, before any registry lookup).
    """
    import transformers.pipelines as transformers_pipelines
    from transformers import AutoModelForQuestionAnswering

    registry = transformers_pipelines.PIPELINE_REGISTRY if registry is None else registry
    removed_tasks = getattr(transformers_pipelines, "REMOVED_TASKS", {}) if removed_tasks is None else removed_tasks
    tasks = [TASK]
    if LEGACY_TASK not in removed_tasks and (LEGACY_TASK not in registry.supported_tasks or _owned_by_hf_fff(registry, LEGACY_TASK)):
        tasks.append(LEGACY_TASK)
    for task in tasks:
        if _owned_by_hf_fff(registry, task):
            del registry.supported_tasks[task]  # re-import (importlib.reload): replace without the overwrite warning
        registry.register_pipeline(task, pipeline_class=ExtractiveQuestionAnsweringPipeline, pt_model=AutoModelForQuestionAnswering, type="text")
    return tasks


__all__ = ["ExtractiveQuestionAnsweringPipeline", "TASK", "ranked_spans", "examples_from_arguments", "register_pipelines"]
