"""What the ecosystem integrations cost on this CPU: UltraFastBERT-1x11 vs BERT-base, random weights, fp32.

    python benchmarks/bench_ecosystem.py [--repeats 5] [--json FILE.json]

Three measurements, each taken for both models in one process, the two models alternating call by call
so that a change in machine load hits both alike; medians are reported:
  1. extractive QA pipeline throughput (hf_fff's `extractive-question-answering`, 16 examples, batch 8,
     contexts of 100 words, split into 128-token chunks with the default stride), in examples/s;
  2. SentenceTransformer.encode throughput (mean pooling, batch 32, sentences of about 30 tokens), in
     sentences/s;
  3. one LoRA training step (r=8 on the attention projections, QA head in modules_to_save; forward,
     backward, AdamW step) at batch 8 x 128 tokens, in ms.
UltraFastBERT-1x11 is the published geometry (16 layers, 768 wide, one FFF tree of depth 11);
BERT-base is transformers' BertConfig defaults (12 layers, 768 wide, 3072 intermediate). Both use
SDPA attention. The tokenizer is a small WordPiece trained on the spot: token counts, not words, matter.
The load average and thread count are recorded with the numbers: on a shared machine they are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

WORDS = "the a cat dog sat ran on in mat park capital of france paris germany berlin tree node token fast network code is red blue".split()


def corpus(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def build_models():
    """{name: (QA model, LoRA target module names)} at full size, random weights, eval mode."""
    from transformers import BertConfig, BertForQuestionAnswering

    import hf_fff

    torch.manual_seed(0)
    ultrafast = hf_fff.UltraFastBertForQuestionAnswering(hf_fff.UltraFastBertConfig(attn_implementation="sdpa"))
    bert = BertForQuestionAnswering(BertConfig(attn_implementation="sdpa"))
    return {
        "UltraFastBERT-1x11": (ultrafast.eval(), ["qkv", "out_proj"]),
        "BERT-base": (bert.eval(), ["query", "key", "value", "attention.output.dense"]),
    }


def alternate(candidates: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates taking turns call by call."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def save_folders(models, tokenizer, root: Path) -> dict[str, Path]:
    from hf_fff.tools.sentence_transformers import write_sentence_transformers_files

    folders = {}
    for name, (model, _) in models.items():
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_sentence_transformers_files(folder, "mean", max_seq_length=128)
        folders[name] = folder
    return folders


def bench_qa(models, tokenizer, repeats: int, rng: random.Random) -> dict[str, float]:
    from transformers import pipeline

    examples = [{"question": "what is the code ?", "context": context} for context in corpus(rng, 16, 100)]
    pipes = {name: pipeline("extractive-question-answering", model=model, tokenizer=tokenizer, device="cpu") for name, (model, _) in models.items()}
    seconds = alternate({name: (lambda p=p: p(examples, batch_size=8, max_seq_len=128)) for name, p in pipes.items()}, repeats)
    return {name: len(examples) / s for name, s in seconds.items()}


def bench_encode(folders, repeats: int, rng: random.Random) -> dict[str, float]:
    from sentence_transformers import SentenceTransformer

    sentences = corpus(rng, 64, 28)
    encoders = {name: SentenceTransformer(str(folder), device="cpu") for name, folder in folders.items()}
    seconds = alternate({name: (lambda m=m: m.encode(sentences, batch_size=32)) for name, m in encoders.items()}, repeats)
    return {name: len(sentences) / s for name, s in seconds.items()}


def bench_lora_step(models, repeats: int, batch: int = 8, seq: int = 128) -> dict[str, float]:
    import peft

    generator = torch.Generator().manual_seed(0)
    steps = {}
    for name, (model, targets) in models.items():
        config = peft.LoraConfig(task_type="QUESTION_ANS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
        lora = peft.get_peft_model(model, config).train()
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
        vocab = model.config.vocab_size
        input_ids = torch.randint(1, vocab, (batch, seq), generator=generator)
        positions = torch.randint(0, seq, (batch,), generator=generator)

        def step(lora=lora, optimizer=optimizer, input_ids=input_ids, positions=positions):
            loss = lora(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), start_positions=positions, end_positions=positions).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        steps[name] = step
    seconds = alternate(steps, repeats)
    return {name: 1000 * s for name, s in seconds.items()}


def machine() -> dict:
    from importlib.metadata import version

    import transformers

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "uptime": uptime,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": version("sentence-transformers"),
        "peft": version("peft"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model and measurement (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    from hf_fff.tools.demo import train_wordpiece_tokenizer

    rng = random.Random(0)
    tokenizer = train_wordpiece_tokenizer(corpus(rng, 200, 20), 200)
    models = build_models()
    results = {"machine_before": machine()}
    with tempfile.TemporaryDirectory() as root:
        folders = save_folders(models, tokenizer, Path(root))
        with torch.inference_mode():
            results["qa_examples_per_s"] = bench_qa(models, tokenizer, args.repeats, rng)
            results["encode_sentences_per_s"] = bench_encode(folders, args.repeats, rng)
    results["lora_step_ms"] = bench_lora_step(models, args.repeats)
    results["machine_after"] = machine()

    print(f"{results['machine_before']['cpu']}, {results['machine_before']['torch_threads']} torch threads")
    print(f"load before: {results['machine_before']['uptime']}")
    print(f"load after:  {results['machine_after']['uptime']}")
    header = f"{'measurement (median)':<38} {'UltraFastBERT-1x11':>19} {'BERT-base':>11} {'ratio':>7}"
    print(header)
    for key, label, higher_is_better in (
        ("qa_examples_per_s", "QA pipeline, examples/s", True),
        ("encode_sentences_per_s", "SentenceTransformer.encode, sent./s", True),
        ("lora_step_ms", "LoRA training step (8x128), ms", False),
    ):
        ours, bert = results[key]["UltraFastBERT-1x11"], results[key]["BERT-base"]
        speedup = ours / bert if higher_is_better else bert / ours
        print(f"{label:<38} {ours:>19.2f} {bert:>11.2f} {speedup:>6.2f}x")
    print("ratio: UltraFastBERT's speed over BERT-base's (> 1: UltraFastBERT faster)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
