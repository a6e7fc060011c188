"""hf_fff: UltraFastBERT for HuggingFace transformers.

Importing this package registers the `ultrafastbert` model type, and the published `crammedBERT`
checkpoint layout, with transformers' Auto classes, and the `extractive-question-answering` pipeline
(hf_fff.pipelines) with transformers' pipeline registry:

    import hf_fff
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained("pbelcak/UltraFastBERT-1x11-long")
"""

__version__ = "0.1.0"

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .backends import available_backends, set_backend, use_backend
from .configuration_ultrafastbert import CrammedBertConfig, UltraFastBertConfig
from .modeling_ultrafastbert import (
    FastFeedForward,
    UltraFastBertForMaskedLM,
    UltraFastBertForQuestionAnswering,
    UltraFastBertForSequenceClassification,
    UltraFastBertForTokenClassification,
    UltraFastBertModel,
    UltraFastBertPreTrainedModel,
)
from .ops import fast_feedforward
from .tokenization_ultrafastbert import UltraFastBertTokenizerFast

_AUTO_CLASSES = (
    (AutoModel, UltraFastBertModel),
    (AutoModelForMaskedLM, UltraFastBertForMaskedLM),
    (AutoModelForSequenceClassification, UltraFastBertForSequenceClassification),
    (AutoModelForTokenClassification, UltraFastBertForTokenClassification),
    (AutoModelForQuestionAnswering, UltraFastBertForQuestionAnswering),
)


def _register_with_auto_classes() -> None:
    # exist_ok: re-importing (e.g. importlib.reload in tests) must not fail.
    AutoConfig.register(UltraFastBertConfig.model_type, UltraFastBertConfig, exist_ok=True)
    AutoConfig.register(CrammedBertConfig.model_type, CrammedBertConfig, exist_ok=True)
    for auto_class, model_class in _AUTO_CLASSES:
        auto_class.register(UltraFastBertConfig, model_class, exist_ok=True)
    # Used only when a folder's tokenizer_config.json names no tokenizer class (or the folder has none).
    for config_class in (UltraFastBertConfig, CrammedBertConfig):
        AutoTokenizer.register(config_class, UltraFastBertTokenizerFast, exist_ok=True)


_register_with_auto_classes()

# `pipeline("extractive-question-answering", ...)`: registering imports transformers.pipelines' registry
# and base classes only (tens of milliseconds, under 1% of `import hf_fff`), no task implementation.
from .pipelines import ExtractiveQuestionAnsweringPipeline, register_pipelines  # noqa: E402

register_pipelines()

# The user tools load on first use: `import hf_fff` (model registration) never imports conversion,
# publishing or yaml.
_LAZY_TOOLS = {"convert": ("hf_fff.tools.convert", "convert"), "push_to_hub": ("hf_fff.tools.hub", "push_to_hub")}


def __getattr__(name: str):
    if name in _LAZY_TOOLS:
        import importlib

        module_name, attribute = _LAZY_TOOLS[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_fff' has no attribute {name!r}")

__all__ = [
    "UltraFastBertConfig",
    "UltraFastBertModel",
    "UltraFastBertForMaskedLM",
    "UltraFastBertForSequenceClassification",
    "UltraFastBertForTokenClassification",
    "UltraFastBertForQuestionAnswering",
    "UltraFastBertPreTrainedModel",
    "ExtractiveQuestionAnsweringPipeline",
    "UltraFastBertTokenizerFast",
    "FastFeedForward",
    "fast_feedforward",
    "convert",
    "push_to_hub",
    "available_backends",
    "set_backend",
    "use_backend",
]
