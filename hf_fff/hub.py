"""Publishing UltraFastBERT models: model cards, the trust_remote_code export, and `hf-fff push`.

- `render_model_card(config, ...)` fills `model_cards/template.md`: YAML front matter (library_name,
  tags, base_model, pipeline_tag, license, ...) and what the model is, how to load it, the evaluation
  numbers and the `hf-fff bench` speed table the user supplies.
- `export_remote_code(folder)` puts a torch-only copy of the modeling code next to the weights and an
  `auto_map` into config.json, so that the repo also loads with `trust_remote_code=True` where hf_fff is
  not installed (the compiled kernels do not travel; the plain-torch FFF runs there).
- `push_to_hub(model_or_folder, repo_id, ...)` stages a folder (never modifying the user's), renders
  its card, creates the repo if needed and uploads through huggingface_hub's HfApi. The Hub endpoint is
  huggingface_hub's (HF_ENDPOINT is honoured); the token comes from the argument, HF_TOKEN or the stored
  login, and is never printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

PathLike = Union[str, os.PathLike]

PAPER = "https://arxiv.org/abs/2311.10770"
PROJECT = "hf_fff"
DEFAULT_TAGS = ("ultrafastbert", "fast-feedforward", "fff", "hf_fff")
REMOTE_CODE_TAG = "custom_code"

# Files that never belong in a published model repo: Trainer state, checkpoints, logs, caches.
IGNORE_PATTERNS = (
    "checkpoint-*",
    "runs",
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    ".git",
    ".cache",
    "__pycache__",
    "*.lock",
)

# architecture -> (Auto class, pipeline tag, what the head does)
TASKS = {
    "UltraFastBertForMaskedLM": ("AutoModelForMaskedLM", "fill-mask", "masked language modelling"),
    "UltraFastBertForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification", "sequence classification"),
    "UltraFastBertForTokenClassification": ("AutoModelForTokenClassification", "token-classification", "token classification"),
    "UltraFastBertForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering", "extractive question answering"),
    "UltraFastBertModel": ("AutoModel", "feature-extraction", "the bare encoder (hidden states for downstream use)"),
}

# The modeling files a remote-code repo carries, copied verbatim from the installed hf_fff, plus
# `ops.py`, generated from the plain-torch reference backend (the package's ops.py dispatches to
# native backends, which do not travel).
REMOTE_CODE_FILES = ("configuration_ultrafastbert.py", "modeling_ultrafastbert.py", "crammed.py")
REMOTE_OPS_FILE = "ops.py"


class HubTokenError(RuntimeError):
    """No usable Hugging Face token (none found, or the Hub rejected it)."""


class PublishError(ValueError):
    """The folder or the inputs cannot be published as an UltraFastBERT model repo."""


# ----------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------


def load_template(name: str = "template.md") -> str:
    """A file of model_cards/: from the installed package (hf_fff/model_cards), else from a checkout."""
    from importlib import resources

    try:
        packaged = resources.files("hf_fff") / "model_cards" / name
        if packaged.is_file():
            return packaged.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    checkout = Path(__file__).resolve().parent.parent / "model_cards" / name
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise FileNotFoundError(f"model card template {name!r} is neither in the installed hf_fff package nor in {checkout.parent}")


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Replace every `{{ name }}` in one pass; an unknown or unused name is an error, not a blank."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise KeyError(f"model card template needs values for {missing}")
    unused = sorted(set(values) - {m.group(1) for m in _PLACEHOLDER.finditer(template)})
    if unused:
        raise KeyError(f"model card template has no placeholder for {unused}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]).strip("\n"), template)


# ----------------------------------------------------------------------------------------------------
# Reading what a folder holds
# ----------------------------------------------------------------------------------------------------


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a markdown file with optional `---` YAML front matter."""
    if not text.startswith("---"):
        return {}, text
    match = re.match(r"^---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|$)", text, flags=re.DOTALL | re.MULTILINE)
    if match is None:
        raise PublishError("model card front matter starts with '---' but is never closed")
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        raise PublishError(f"model card front matter is not valid YAML: {error}") from None
    if not isinstance(metadata, dict):
        raise PublishError("model card front matter must be a YAML mapping")
    return metadata, text[match.end():]


def card_section(body: str, title: str) -> Optional[str]:
    """The text of the `## title` section of a markdown body, or None."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\r?\n(.*?)(?=^## |\Z)", body, flags=re.DOTALL | re.MULTILINE)
    return match.group(1).strip() if match else None


def safetensors_headers(folder: PathLike) -> dict[str, dict[str, Any]]:
    """tensor name -> {"dtype", "shape", ...} of the folder's safetensors weights (single file or
    sharded index), read from the file headers only. Raises ValueError on a malformed file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")
    headers: dict[str, dict[str, Any]] = {}
    for name in files:
        path = folder / name
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{path} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise ValueError(f"{path}: header length {length} exceeds the file ({size} bytes)")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        data_size = size - 8 - length
        for key, entry in header.items():
            if entry["data_offsets"][1] > data_size:
                raise ValueError(f"{path}: tensor {key!r} extends past the end of the file (truncated?)")
        headers.update(header)
    return headers


def safetensors_parameter_count(folder: PathLike) -> Optional[int]:
    """Number of stored values in the folder's safetensors weights (headers only), or None without weights."""
    try:
        headers = safetensors_headers(folder)
    except FileNotFoundError:
        return None
    return sum(math.prod(entry["shape"]) for entry in headers.values())


def _config_dtype(config: Mapping[str, Any]) -> Optional[str]:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype).replace("torch.", "") if dtype else None


def _config_dict(config) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a config dict or PreTrainedConfig, got {type(config).__name__}")


# ----------------------------------------------------------------------------------------------------
# Card sections
# ----------------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
        return f"{value:.3e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_format_value(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _load_json_argument(value: Union[None, PathLike, Mapping, Sequence], what: str):
    if value is None or isinstance(value, (Mapping, list)):
        return value
    path = Path(value)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise PublishError(f"{what} file {path} is not valid JSON: {error}") from None


def render_metrics(metrics: Union[None, PathLike, Mapping[str, Any]]) -> str:
    """Evaluation numbers as a markdown table.

    Accepts a flat mapping ({"accuracy": 0.91}, Trainer's eval_results.json / all_results.json) or one
    level of grouping per task/dataset ({"glue/sst2": {"accuracy": 0.91, "f1": 0.9}}).
    """
    metrics = _load_json_argument(metrics, "metrics")
    if not metrics:
        return "No evaluation results were supplied with this upload."
    if not isinstance(metrics, Mapping):
        raise PublishError("metrics must be a JSON object: {\"metric\": value} or {\"task\": {\"metric\": value}}")
    flat, grouped = [], []
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            for metric, number in value.items():
                if isinstance(number, (Mapping, list)):
                    raise PublishError(f"metrics[{name!r}][{metric!r}] is nested too deeply; give a number or a string")
                grouped.append((name, metric, number))
        elif isinstance(value, list):
            raise PublishError(f"metrics[{name!r}] is a list; give a number, a string, or an object of metrics")
        else:
            flat.append((name, value))
    if grouped:
        rows = [("", name, value) for name, value in flat] + grouped
        return _table(("Task", "Metric", "Value"), rows)
    return _table(("Metric", "Value"), flat)


_BENCH_ROW_KEYS = ("results", "rows", "measurements", "runs", "benchmarks")
_BENCH_SECTIONS = ("layer", "encoder")  # what `hf-fff bench --json` writes, next to "meta"


def _format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _bench_section_table(section: Mapping[str, Any], name: str) -> str:
    rows, baselines = section.get("rows"), list(section.get("baselines") or [])
    if not isinstance(rows, list) or not rows:
        raise PublishError(f"bench JSON section {name!r} has no rows")
    header = ["tokens", "implementation", "median", "ns/token", *(f"vs {b}" for b in baselines)]
    body = []
    for row in rows:
        try:
            speedup = row.get("speedup") or {}
            ratios = [f"{speedup[b]:.2f}x" if b in speedup else "1x (baseline)" if row["name"] == b else "" for b in baselines]
            ns_per_token = row.get("ns_per_token", row["median_s"] * 1e9 / max(row["tokens"], 1))
            body.append([row["tokens"], row["name"], _format_seconds(row["median_s"]), f"{ns_per_token:,.0f}", *ratios])
        except (KeyError, TypeError, AttributeError) as error:
            raise PublishError(f"bench JSON section {name!r} has a malformed row ({error!r}): {row}") from None
    return _table(header, body)


def _render_hf_fff_bench(bench: Mapping[str, Any]) -> str:
    meta = bench.get("meta") or {}
    where = ""
    if meta.get("device_name") or meta.get("device"):
        where = f" on {meta.get('device_name') or meta.get('device')}"
        details = [str(meta["device"])] if meta.get("device") and meta.get("device_name") else []
        if meta.get("cpu_threads"):
            details.append(f"{meta['cpu_threads']} CPU threads")
        where += f" ({', '.join(details)})" if details else ""
    facts = [f for f in (meta.get("dtype"), meta.get("torch") and f"torch {meta['torch']}", meta.get("date")) if f]
    intro = f"Measured with `hf-fff bench`{where}" + (", " + ", ".join(facts) if facts else "")
    intro += f"; FFF backend: {meta['fff_backend']}." if meta.get("fff_backend") else "."
    parts = [intro]
    if "layer" in bench:
        layer = bench["layer"]
        parts.append(
            f"One FFF layer (hidden {layer.get('hidden')}, depth {layer.get('depth')}, one tree) against dense "
            "feedforward layers, median time per call:"
        )
        parts.append(_bench_section_table(layer, "layer"))
    if "encoder" in bench:
        encoder = bench["encoder"]
        parts.append(f"The whole encoder, batch {encoder.get('batch')} x {encoder.get('seq')} tokens, random weights:")
        parts.append(_bench_section_table(encoder, "encoder"))
    return "\n\n".join(parts)


def render_bench(bench: Union[None, PathLike, Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> str:
    """A speed section from the JSON written by `hf-fff bench --json FILE` ({"meta", "layer", "encoder"}):
    the run's machine line and one markdown table per section.

    Other timing JSON is accepted too: a list of row objects, or an object holding such a list (under
    "results", "rows", "measurements", "runs" or "benchmarks") next to scalar facts about the run.
    """
    bench = _load_json_argument(bench, "bench")
    if not bench:
        return "No speed measurements were supplied with this upload. `hf-fff bench` measures this model on your hardware."
    if isinstance(bench, Mapping) and any(isinstance(bench.get(k), Mapping) for k in _BENCH_SECTIONS):
        return _render_hf_fff_bench(bench)
    environment: dict[str, Any] = {}
    if isinstance(bench, Mapping):
        key = next((k for k in _BENCH_ROW_KEYS if isinstance(bench.get(k), list)), None)
        if key is None:
            raise PublishError(
                "bench JSON must be what `hf-fff bench --json` writes, a list of rows, or an object with a list "
                f"under one of {list(_BENCH_ROW_KEYS)}"
            )
        rows = bench[key]
        for name, value in bench.items():
            if name == key:
                continue
            if isinstance(value, Mapping):
                environment.update({f"{name}.{k}": v for k, v in value.items() if not isinstance(v, (Mapping, list))})
            elif not isinstance(value, list):
                environment[name] = value
    else:
        rows = list(bench)
    if not rows or not all(isinstance(row, Mapping) for row in rows):
        raise PublishError("bench JSON rows must be a non-empty list of objects")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns and not isinstance(row[c], (Mapping, list))]
    table = _table(columns, [[row.get(c, "") for c in columns] for row in rows])
    if environment:
        facts = ", ".join(f"{k}: {_format_value(v)}" for k, v in environment.items())
        return f"Measured with `hf-fff bench` ({facts}).\n\n{table}"
    return f"Measured with `hf-fff bench`.\n\n{table}"


def _usage(architecture: str, repo_id: str, revision: Optional[str], *, remote: bool) -> str:
    auto_class = TASKS.get(architecture, TASKS["UltraFastBertModel"])[0]
    load_args = f'"{repo_id}"' + (f', revision="{revision}"' if revision else "")
    model_args = load_args + (", trust_remote_code=True" if remote else "")
    lines = ["import torch"]
    if not remote:
        lines.append("import hf_fff  # registers the ultrafastbert model type with transformers")
    lines += [
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({load_args})",
        f"model = {auto_class}.from_pretrained({model_args}).eval()",
        "",
    ]
    if architecture == "UltraFastBertForMaskedLM":
        lines += [
            'inputs = tokenizer(f"The capital of France is {tokenizer.mask_token}.", return_tensors="pt")',
            "with torch.no_grad():",
            "    logits = model(**inputs).logits",
            'masked = inputs["input_ids"][0] == tokenizer.mask_token_id',
            "print(tokenizer.decode(logits[0, masked].argmax(-1)))",
        ]
    elif architecture == "UltraFastBertForSequenceClassification":
        lines += [
            'inputs = tokenizer("A fast and accurate model.", return_tensors="pt")',
            "with torch.no_grad():",
            "    label = model(**inputs).logits.argmax(-1).item()",
            "print(model.config.id2label[label])",
        ]
    elif architecture == "UltraFastBertForTokenClassification":
        lines += [
            'inputs = tokenizer("Paris is the capital of France.", return_tensors="pt")',
            "with torch.no_grad():",
            "    labels = model(**inputs).logits.argmax(-1)[0]",
            'print([model.config.id2label[i.item()] for i in labels])',
        ]
    elif architecture == "UltraFastBertForQuestionAnswering":
        lines += [
            'inputs = tokenizer("What is the capital of France?", "Paris is the capital of France.", return_tensors="pt")',
            "with torch.no_grad():",
            "    out = model(**inputs)",
            "start, end = out.start_logits.argmax(-1).item(), out.end_logits.argmax(-1).item()",
            'print(tokenizer.decode(inputs["input_ids"][0, start : end + 1]))',
        ]
    else:
        lines += [
            'inputs = tokenizer("Fast feedforward networks.", return_tensors="pt")',
            "with torch.no_grad():",
            "    hidden = model(**inputs).last_hidden_state  # (batch, seq_len, hidden_size)",
        ]
    return "\n".join(lines)


def _architecture_table(config: Mapping[str, Any], architecture: str, parameters: Optional[int]) -> str:
    depth, trees = int(config.get("fff_depth", 11)), int(config.get("fff_trees", 1))
    nodes = 2 ** (depth + 1) - 1
    task = TASKS.get(architecture, (None, None, "custom head"))[2]
    rows = [
        ("Architecture", f"`{architecture}` ({task})"),
        ("Layers", config.get("num_hidden_layers")),
        ("Hidden size", config.get("hidden_size")),
        ("Attention heads", config.get("num_attention_heads")),
        ("FFF trees x depth", f"{trees} x {depth} ({nodes} neurons per tree)"),
        ("Feedforward neurons used per token and layer", f"{trees * (depth + 1)} of {trees * nodes} ({100 * (depth + 1) / nodes:.2g}%)"),
        ("Vocabulary", config.get("vocab_size")),
        ("Trained sequence length", config.get("max_position_embeddings")),
    ]
    if parameters:
        rows.append(("Parameters", f"{parameters / 1e6:.1f}M"))
    if _config_dtype(config):
        rows.append(("Weights", _config_dtype(config)))
    labels = config.get("id2label") or {}
    if architecture in ("UltraFastBertForSequenceClassification", "UltraFastBertForTokenClassification") and labels:
        names = [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
        rows.append(("Labels", ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")))
    return _table(("", ""), rows)


def _remote_code_section(repo_id: str, architecture: str, revision: Optional[str]) -> str:
    files = ", ".join(f"`{name}`" for name in (*REMOTE_CODE_FILES, REMOTE_OPS_FILE))
    return (
        "### Without hf_fff: `trust_remote_code=True`\n\n"
        f"The repository also carries a plain-PyTorch copy of the modeling code ({files}), so it loads on a "
        "machine where hf_fff is not installed. That path runs the reference PyTorch implementation of the FFF "
        "layer (the compiled CPU/CUDA kernels do not travel with the repository): same outputs, slower. Read "
        "the code before trusting it.\n\n"
        "```python\n" + _usage(architecture, repo_id, revision, remote=True) + "\n```"
    )


def render_model_card(
    config,
    *,
    repo_id: str,
    revision: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    tags: Sequence[str] = (),
    metrics: Union[None, PathLike, Mapping[str, Any]] = None,
    bench: Union[None, PathLike, Mapping[str, Any], Sequence[Mapping[str, Any]]] = None,
    remote_code: bool = False,
    parameters: Optional[int] = None,
    provenance: Optional[str] = None,
    extra_metadata: Optional[Mapping[str, Any]] = None,
    template: Optional[str] = None,
) -> str:
    """The README.md of an UltraFastBERT repo: YAML front matter plus markdown, from model_cards/template.md.

    config: the model's config (dict or UltraFastBertConfig). metrics / bench: dicts or JSON file paths
    (see `render_metrics`, `render_bench`). extra_metadata: more front-matter keys carried over from an
    existing card (datasets, language, model-index, ...); ours take precedence except tags, which merge.
    """
    config = _config_dict(config)
    if config.get("model_type") != "ultrafastbert":
        raise PublishError(f"config has model_type {config.get('model_type')!r}; expected 'ultrafastbert' (run `hf-fff convert` first)")
    architecture = (config.get("architectures") or ["UltraFastBertModel"])[0]
    pipeline_tag = TASKS.get(architecture, (None, None, None))[1]
    extra = dict(extra_metadata or {})
    merged_tags = list(dict.fromkeys([*DEFAULT_TAGS, *([REMOTE_CODE_TAG] if remote_code else []), *tags, *(extra.pop("tags", None) or [])]))
    metadata: dict[str, Any] = {"library_name": "transformers", "tags": merged_tags}
    if pipeline_tag:
        metadata["pipeline_tag"] = pipeline_tag
    if base_model:
        metadata["base_model"] = base_model
    if license:
        metadata["license"] = license
    for key in ("library_name", "pipeline_tag", "base_model", "license"):
        extra.pop(key, None)
    metadata.update(extra)

    depth, trees = int(config.get("fff_depth", 11)), int(config.get("fff_trees", 1))
    nodes = 2 ** (depth + 1) - 1
    task = TASKS.get(architecture, (None, None, "a custom head"))[2]
    relation = ""
    if base_model:
        relation = f" It derives from [`{base_model}`](https://huggingface.co/{base_model})."
    summary = (
        f"An [UltraFastBERT]({PAPER}) model for {task}, in the native transformers format of {PROJECT}.{relation}\n\n"
        f"UltraFastBERT is a BERT-style encoder whose feedforward layers are *fast feedforward* (FFF) networks: each "
        f"layer holds {trees} binary tree{'s' if trees > 1 else ''} of depth {depth}, and every token walks one "
        f"root-to-leaf path per tree, so it evaluates {depth + 1} of the {nodes} neurons of each tree. {PROJECT} "
        "computes only those neurons (CPU and CUDA kernels, with a plain-PyTorch fallback) instead of masking a dense layer."
    )
    values = {
        "metadata": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False).strip(),
        "title": repo_id.split("/")[-1],
        "summary": summary,
        "architecture": _architecture_table(config, architecture, parameters),
        "usage": _usage(architecture, repo_id, revision, remote=False),
        "remote_code": _remote_code_section(repo_id, architecture, revision) if remote_code else "",
        "evaluation": render_metrics(metrics),
        "speed": render_bench(bench),
        "provenance": provenance or f"Published with `hf-fff push` ({PROJECT}).",
    }
    card = fill_template(template if template is not None else load_template(), values)
    card = re.sub(r"\n{3,}", "\n\n", card)
    split_front_matter(card)  # the front matter we wrote must parse back
    return card


PUBLISHED_SOURCE = "pbelcak/UltraFastBERT-1x11-long"
# Where the native conversion of PUBLISHED_SOURCE is meant to be published (used by the ready card only;
# `hf-fff push` always renders the card for the repo it pushes to).
PUBLISHED_NATIVE_REPO = "hf-fff/UltraFastBERT-1x11-long"
PUBLISHED_LICENSE = "mit"  # the license of the source repository, carried over


def reference_card_for_published_model(bench=None, repo_id: str = PUBLISHED_NATIVE_REPO) -> str:
    """The ready model card (model_cards/UltraFastBERT-1x11-long.md) of UltraFastBERT-1x11-long in the
    native format: UltraFastBertConfig's defaults are the published model."""
    import torch

    from .configuration_ultrafastbert import UltraFastBertConfig
    from .modeling_ultrafastbert import UltraFastBertForMaskedLM

    config = UltraFastBertConfig(architectures=["UltraFastBertForMaskedLM"])
    with torch.device("meta"):
        parameters = sum(p.numel() for p in UltraFastBertForMaskedLM(config).parameters())
    config_dict = {**config.to_dict(), "dtype": "float32"}
    return render_model_card(
        config_dict,
        repo_id=repo_id,
        base_model=PUBLISHED_SOURCE,
        license=PUBLISHED_LICENSE,
        remote_code=True,
        parameters=parameters,
        bench=bench,
        provenance=(
            f"Converted from the published crammedBERT layout of [`{PUBLISHED_SOURCE}`](https://huggingface.co/{PUBLISHED_SOURCE}) "
            f"with `hf-fff convert {PUBLISHED_SOURCE} UltraFastBERT-1x11-long` (weights in float32). The conversion renames "
            "the tensors, regroups the per-head q/k/v rows and transposes the FFF output weights; it computes exactly what "
            "the original code computes, and `hf-fff convert` reloads the result and compares it with the source on random "
            "token ids before writing it. The decoder is tied to the word embedding, so the file stores one copy of it "
            "(the original stored two)."
        ),
    )


# ----------------------------------------------------------------------------------------------------
# trust_remote_code export
# ----------------------------------------------------------------------------------------------------

_REMOTE_OPS_SHIM = '''

# ---- the entry points modeling_ultrafastbert.py uses (plain torch: no custom op, no native kernels)


def check_fff_arguments(x, weight_in, bias_in, weight_out, depth: int) -> int:
    """Raise for weights that do not fit `x` and `depth`; return the number of trees."""
    n_nodes = nodes_per_tree(depth)
    if weight_in.dim() != 2 or weight_in.shape[1] != x.shape[-1] or weight_in.shape[0] % n_nodes:
        raise ValueError(
            f"FFF weight_in must have shape (trees * {n_nodes}, {x.shape[-1]}) for depth {depth}, got {tuple(weight_in.shape)}"
        )
    if weight_out.shape != weight_in.shape or bias_in.shape != (weight_in.shape[0],):
        raise ValueError("FFF weight_out must match weight_in, and bias_in must have one entry per row")
    return weight_in.shape[0] // n_nodes


def run_fff(x, weight_in, bias_in, weight_out, depth: int, trees: int):
    """x (..., H) -> (y (..., H), leaves (..., trees) int64). Autograd runs through the gathers of
    `fff_forward`; routing decisions are constants, so the gradient is that of the path each token took."""
    y, leaves = fff_forward(x.reshape(-1, x.shape[-1]), weight_in, bias_in, weight_out, depth)
    return y.view(x.shape), leaves.view(*x.shape[:-1], trees)


def fast_feedforward(x, weight_in, bias_in, weight_out, depth: int):
    return run_fff(x, weight_in, bias_in, weight_out, depth, check_fff_arguments(x, weight_in, bias_in, weight_out, depth))
'''


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def remote_code_sources(package_dir: Optional[PathLike] = None) -> dict[str, str]:
    """file name -> source text of the flat, torch-only modeling code a remote-code repo carries.

    package_dir: where to read the hf_fff sources (default: this installed package)."""
    package = Path(package_dir) if package_dir is not None else _package_dir()
    sources = {name: (package / name).read_text(encoding="utf-8") for name in REMOTE_CODE_FILES}
    reference = (package / "backends" / "reference.py").read_text(encoding="utf-8")
    header = (
        '"""FFF for trust_remote_code: the plain-PyTorch reference of hf_fff (hf_fff/backends/reference.py),\n'
        'plus the `fast_feedforward` entry point. Generated by hf_fff.hub.export_remote_code; install hf_fff for\n'
        'the compiled CPU/CUDA kernels."""\n\n'
    )
    sources[REMOTE_OPS_FILE] = header + _strip_docstring(reference) + _REMOTE_OPS_SHIM
    _check_flat(sources)
    return sources


def _strip_docstring(source: str) -> str:
    tree = ast.parse(source)
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(getattr(tree.body[0], "value", None), ast.Constant):
        lines = source.splitlines(keepends=True)
        return "".join(lines[tree.body[0].end_lineno:]).lstrip("\n")
    return source


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _check_flat(sources: Mapping[str, str]) -> None:
    """Every relative import of the exported files must name a shipped module and names it defines,
    and nothing may import hf_fff itself: a remote-code repo is loaded where hf_fff is not installed."""
    modules = {name[:-3]: ast.parse(text) for name, text in sources.items()}
    for filename, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level > 1:
                    raise PublishError(f"{filename}: `from {'.' * node.level}{node.module or ''} import ...` leaves the flat remote-code folder")
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                for target in targets:
                    if target.split(".")[0] not in modules:
                        raise PublishError(
                            f"{filename} imports .{target}, which the remote-code export does not ship "
                            f"(shipped: {sorted(modules)}); it cannot load with trust_remote_code"
                        )
                if node.module:
                    missing = {a.name for a in node.names} - _top_level_names(modules[node.module.split(".")[0]])
                    if missing:
                        raise PublishError(f"{filename} imports {sorted(missing)} from .{node.module}, which the exported {node.module}.py lacks")
            elif isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "hf_fff" for alias in node.names):
                raise PublishError(f"{filename} imports hf_fff, which a trust_remote_code user does not have")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_fff" and not node.level:
                raise PublishError(f"{filename} imports from hf_fff, which a trust_remote_code user does not have")


def auto_map() -> dict[str, str]:
    classes = {
        "AutoConfig": "configuration_ultrafastbert.UltraFastBertConfig",
        **{auto: f"modeling_ultrafastbert.{arch}" for arch, (auto, _, _) in TASKS.items()},
    }
    return classes


def export_remote_code(folder: PathLike) -> list[str]:
    """Write the torch-only modeling code into `folder` and `auto_map` into its config.json; returns the
    files written. The folder must already hold a native config.json."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "ultrafastbert":
        raise PublishError(f"{config_path} has model_type {config.get('model_type')!r}; expected 'ultrafastbert'")
    written = []
    for name, text in remote_code_sources().items():
        _replace_file(folder / name, text)
        written.append(name)
    config["auto_map"] = auto_map()
    _replace_file(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written + ["config.json"]


def _replace_file(path: Path, text: str) -> None:
    """Write a file without touching what it may be hard-linked to (the staging folder links the user's files)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------


def resolve_token(token: Optional[str] = None) -> tuple[str, str]:
    """(token, where it came from) from the argument, HF_TOKEN, or huggingface_hub's stored login.

    Raises HubTokenError when there is none. The token itself never appears in any message.
    """
    if token:
        return token, "the token argument"
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubTokenError(
            "No Hugging Face token found, and publishing needs one with write access. Log in with "
            "`hf auth login`, or set the HF_TOKEN environment variable, or pass token=... (--token)."
        )
    env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    return found, "the HF_TOKEN environment variable" if env and env == found else "the stored `hf auth login` token"


# ----------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------


@dataclass
class PushReport:
    repo_id: str
    repo_url: str
    commit_url: str
    revision: str
    pr_url: Optional[str]
    files: list[str] = field(default_factory=list)
    remote_code: bool = False

    def summary(self) -> str:
        lines = [f"pushed {len(self.files)} files to {self.repo_url} ({self.revision})", f"  commit: {self.commit_url}"]
        if self.pr_url:
            lines.append(f"  pull request: {self.pr_url}")
        if self.remote_code:
            lines.append("  loads with `import hf_fff` + Auto classes, or with trust_remote_code=True without hf_fff")
        return "\n".join(lines)


def _ignored(relative: Path) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(part, pattern) for part in relative.parts for pattern in IGNORE_PATTERNS) or relative.name.startswith("_")


def stage_folder(source: PathLike, staging: PathLike) -> list[str]:
    """Mirror the publishable files of `source` into `staging` (hard links where possible, else copies)."""
    source, staging = Path(source), Path(staging)
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or _ignored(relative):
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        copied.append(relative.as_posix())
    return copied


def _check_native_folder(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PublishError(f"{folder} has no config.json; save the model with save_pretrained (or `hf-fff convert`) first")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type == "crammedBERT" or ("arch" in config and model_type is None):
        raise PublishError(f"{folder} holds the original crammedBERT layout; run `hf-fff convert {folder} NEW_FOLDER` and push that")
    if model_type != "ultrafastbert":
        raise PublishError(f"{config_path} has model_type {model_type!r}, not 'ultrafastbert'")
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise PublishError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")
    return config


def prepare_repo_folder(
    folder: PathLike,
    *,
    repo_id: str,
    revision: Optional[str] = None,
    metrics=None,
    bench=None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    tags: Sequence[str] = (),
    remote_code: bool = True,
    card: bool = True,
) -> list[str]:
    """Turn a staged native folder into the exact content of the repo: card and remote code added.

    An existing README.md is kept as the card when card=False; otherwise its front matter (license,
    base_model, datasets, language, model-index, tags) and an hf_fff "Provenance" section carry over.
    """
    folder = Path(folder)
    config = _check_native_folder(folder)
    if remote_code:
        export_remote_code(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if card:
        readme = folder / "README.md"
        carried, provenance = {}, None
        if readme.is_file():
            carried, body = split_front_matter(readme.read_text(encoding="utf-8"))
            if "hf_fff" in (carried.get("tags") or []):
                provenance = card_section(body, "Provenance")
        text = render_model_card(
            config,
            repo_id=repo_id,
            revision=revision,
            base_model=base_model or carried.get("base_model"),
            license=license or carried.get("license"),
            tags=tags,
            metrics=metrics,
            bench=bench,
            remote_code=remote_code,
            parameters=safetensors_parameter_count(folder),
            provenance=provenance,
            extra_metadata={k: v for k, v in carried.items() if k not in ("base_model", "license")},
        )
        _replace_file(readme, text)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push_to_hub(
    model_or_folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str] = None,
    metrics=None,
    bench=None,
    commit_message: Optional[str] = None,
    tokenizer=None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    tags: Sequence[str] = (),
    remote_code: bool = True,
    card: bool = True,
) -> PushReport:
    """Publish an UltraFastBERT model (a PreTrainedModel, or a folder written by save_pretrained,
    Trainer.save_model or `hf-fff convert`) to the Hub repo `repo_id`, creating it if needed.

    revision: branch to commit to (created from main if missing). create_pr: open a pull request
    against main instead of committing. metrics / bench: dicts or JSON files rendered into the card.
    remote_code: also ship the torch-only modeling code + auto_map (trust_remote_code=True loading).
    card: render README.md (False keeps the folder's own). The user's folder is never modified.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if create_pr and revision not in (None, "main"):
        raise PublishError("create_pr opens a pull request against main; do not combine it with revision")
    if "/" not in repo_id:
        raise PublishError(f"repo_id must be 'namespace/name', got {repo_id!r}")
    # Validate inputs before any network traffic.
    _load_json_argument(metrics, "metrics")
    _load_json_argument(bench, "bench")
    token, token_source = resolve_token(token)
    api = HfApi(token=token)
    try:
        api.whoami(token=token)  # fails fast, before staging, on a bad token
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubTokenError(f"The Hugging Face token from {token_source} was rejected by {api.endpoint} (HTTP {status}); "
                                "check that it is valid and has write access.") from None
        raise

    with tempfile.TemporaryDirectory(prefix="hf_fff-push-") as staging_dir:
        staging = Path(staging_dir) / "repo"
        staging.mkdir()
        if isinstance(model_or_folder, (str, os.PathLike)):
            source = Path(model_or_folder)
            if not source.is_dir():
                raise PublishError(f"{source} is not a folder")
            stage_folder(source, staging)
        elif hasattr(model_or_folder, "save_pretrained"):
            model_or_folder.save_pretrained(staging)
        else:
            raise PublishError(f"push_to_hub takes a model with save_pretrained or a folder, got {type(model_or_folder).__name__}")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = prepare_repo_folder(
            staging, repo_id=repo_id, revision=None if create_pr else revision, metrics=metrics, bench=bench,
            base_model=base_model, license=license, tags=tags, remote_code=remote_code, card=card,
        )
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        target = revision or "main"
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload UltraFastBERT model with {PROJECT}"
        info = api.upload_folder(
            repo_id=repo_id, folder_path=staging, commit_message=message, revision=None if create_pr else revision,
            create_pr=create_pr,
        )
    return PushReport(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        revision=getattr(info, "pr_revision", None) or target,
        pr_url=info.pr_url,
        files=files,
        remote_code=remote_code,
    )


# ----------------------------------------------------------------------------------------------------
# CLI glue (hf_fff.cli builds the parser and calls these)
# ----------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Upload a native UltraFastBERT folder (save_pretrained / Trainer.save_model / `hf-fff convert` output) "
        "to the Hugging Face Hub, with a rendered model card and the trust_remote_code modeling files. "
        "The token comes from HF_TOKEN or `hf auth login` (or --token); HF_ENDPOINT selects the Hub."
    )
    parser.add_argument("folder", help="folder holding config.json (model_type ultrafastbert) and model.safetensors")
    parser.add_argument("repo_id", help="target repository, namespace/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private (ignored if it exists)")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing")
    parser.add_argument("--token", help="Hub token; prefer HF_TOKEN or `hf auth login`, which keep it out of shell history")
    parser.add_argument("--metrics", metavar="FILE.json", help='evaluation numbers for the card: {"metric": value} or {"task": {"metric": value}}')
    parser.add_argument("--bench", metavar="FILE.json", help="speed table for the card, as written by `hf-fff bench --json FILE`")
    parser.add_argument("--commit-message", help="commit (or pull request) title")
    parser.add_argument("--base-model", help="Hub id this model derives from (front matter base_model)")
    parser.add_argument("--license", help="license identifier for the card (default: carried over from the folder's card)")
    parser.add_argument("--tag", action="append", default=[], dest="tags", help="extra card tag (repeatable)")
    parser.add_argument("--no-remote-code", action="store_true", help="do not ship the trust_remote_code modeling files")
    parser.add_argument("--keep-card", action="store_true", help="upload the folder's README.md as is instead of rendering one")


def cli_main(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        report = push_to_hub(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            token=args.token,
            metrics=args.metrics,
            bench=args.bench,
            commit_message=args.commit_message,
            base_model=args.base_model,
            license=args.license,
            tags=args.tags,
            remote_code=not args.no_remote_code,
            card=not args.keep_card,
        )
    except (HubTokenError, PublishError, HfHubHTTPError, OSError) as error:
        print(f"hf-fff push: error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


__all__ = [
    "HubTokenError",
    "PublishError",
    "PushReport",
    "auto_map",
    "export_remote_code",
    "load_template",
    "prepare_repo_folder",
    "push_to_hub",
    "remote_code_sources",
    "render_bench",
    "render_metrics",
    "render_model_card",
    "resolve_token",
    "add_cli_arguments",
    "cli_main",
]
