"""`hf-fff demo`: the main job, offline. Load UltraFastBERT-1x11-long, fill some masks, time FFF vs dense.

The Hub weights are used when they are in the local Hugging Face cache (or with --download); otherwise
the demo says so loudly and builds the same architecture with random weights, which keeps every
timing meaningful and every prediction meaningless.
"""

from __future__ import annotations

import time

import torch

HUB_MODEL_ID = "pbelcak/UltraFastBERT-1x11-long"
DEMO_SENTENCES = ("Paris is the [MASK] of France.", "The quick brown fox [MASK] over the lazy dog.")

# A stand-in vocabulary source for the random-weight model's tokenizer (the real one is on the Hub).
_TOKENIZER_CORPUS = (
    "paris is the capital of france and berlin is the capital of germany . the quick brown fox jumps over the lazy dog . "
    "fast feedforward networks route every token down a binary tree and use twelve of four thousand neurons . "
    "language models predict the masked word from the words around it ."
)


class DemoError(RuntimeError):
    """The model the user named cannot be loaded (a damaged local folder, a broken cached repo)."""


def load_model_and_tokenizer(model_id: str, download: bool):
    """(model, tokenizer, label). A Hub id that is not available here falls back to random weights + a
    locally trained tokenizer, labelled as such; a local folder that does not load is a DemoError (the
    user asked for that model: answering with noise would hide the damage)."""
    from pathlib import Path

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        model = AutoModelForMaskedLM.from_pretrained(model_id, local_files_only=not download)
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=not download)
        return model, tokenizer, f"{model_id} (pretrained weights)"
    except Exception as error:  # transformers, safetensors, tokenizers and json each raise their own types
        if Path(model_id).expanduser().exists() or not isinstance(error, OSError):
            raise DemoError(f"cannot load {model_id}: {type(error).__name__}: {error}") from None
        print(f"note: {model_id} is not available here ({type(error).__name__}); "
              "using RANDOM WEIGHTS in the UltraFastBERT-1x11-long architecture: timings are real, predictions are noise.")
    from .. import UltraFastBertConfig, UltraFastBertForMaskedLM

    torch.manual_seed(0)
    model = UltraFastBertForMaskedLM(UltraFastBertConfig())
    return model, standin_tokenizer(), "UltraFastBERT-1x11-long architecture, RANDOM WEIGHTS"


def standin_tokenizer():
    """The demo's tokenizer when the real one is not cached: trained on the spot on a few sentences."""
    return train_wordpiece_tokenizer([_TOKENIZER_CORPUS] * 8, vocab_size=400)


def train_wordpiece_tokenizer(texts, vocab_size: int):
    """A lower-casing WordPiece BertTokenizerFast with BERT's special tokens and [CLS] a [SEP] b [SEP]
    templates, trained on `texts` (the real UltraFastBERT tokenizer lives on the Hub)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def whole_words(tokenizer) -> list[str]:
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w not in tokenizer.all_special_tokens)


def run_demo(model_id: str = HUB_MODEL_ID, device: str | None = None, download: bool = False, bench: bool = True) -> int:
    from transformers import pipeline

    from .. import backends
    from . import bench as bench_module

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model, tokenizer, label = load_model_and_tokenizer(model_id, download)
    model = model.to(device).eval()
    print(f"model: {label}; loaded in {time.perf_counter() - started:.1f} s; device {device}; "
          f"FFF backend {backends.resolve(torch.device(device).type)[0]}")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=torch.device(device), top_k=3)
    # The stand-in tokenizer knows a few hundred of the model's 32768 ids: rank only those, so that even
    # noise prints as words.
    targets = None if "pretrained" in label else whole_words(tokenizer)
    for sentence in DEMO_SENTENCES:
        guesses = ", ".join(f"{g['token_str']!r} ({g['score']:.3f})" for g in fill(sentence, targets=targets))
        print(f"fill-mask: {sentence}  ->  {guesses}")
    if bench:
        print()
        bench_module.run_bench(device=device, tokens=(1, 128, 4096), encoder=False)
    return 0
