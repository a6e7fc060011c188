"""Model cards of UltraFastBERT repos: `render_model_card(config, ...)` fills `model_cards/template.md`
with YAML front matter (library_name, tags, base_model, pipeline_tag, license, ...), what the model is,
how to load it, the evaluation numbers and the `hf-fff bench` speed table the user supplies; plus the
ready card of the published model and the helpers that read what a model folder holds.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

PathLike = Union[str, os.PathLike]

PAPER = "https://arxiv.org/abs/2311.10770"
PROJECT = "hf_fff"
DEFAULT_TAGS = ("ultrafastbert", "fast-feedforward", "fff", "hf_fff")
REMOTE_CODE_TAG = "custom_code"

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
    checkout = Path(__file__).resolve().parents[2] / "model_cards" / name
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


def load_json_argument(value: Union[None, PathLike, Mapping, Sequence], what: str):
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
    metrics = load_json_argument(metrics, "metrics")
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
    bench = load_json_argument(bench, "bench")
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

    from ..configuration_ultrafastbert import UltraFastBertConfig
    from ..modeling_ultrafastbert import UltraFastBertForMaskedLM

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


