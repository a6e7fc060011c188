"""The tokenizer AutoTokenizer picks for an UltraFastBERT folder whose tokenizer_config.json names none.

UltraFastBERT has no tokenizer of its own: the published checkpoint ships a `tokenizer.json` (a WordPiece
`tokenizers` serialization) that PreTrainedTokenizerFast loads as is. Without a class registered for the
`ultrafastbert` and `crammedBERT` model types, AutoTokenizer falls back to a generic backend, and a folder
without tokenizer files (a model saved with `save_pretrained`, a converted folder whose source had none)
then fails with transformers' advice to install sentencepiece or tiktoken, which does not help. This class
loads the same files and says instead which folder lacks a tokenizer and how to get one.
"""

from __future__ import annotations

import os
from typing import Union

from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast
from transformers.utils.hub import cached_file

TOKENIZER_FILE = "tokenizer.json"
PUBLISHED_MODEL_ID = "pbelcak/UltraFastBERT-1x11-long"
# from_pretrained arguments that say where to look for a file (the rest are the tokenizer's own settings).
_LOCATION_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def missing_tokenizer_message(source: Union[str, os.PathLike]) -> str:
    return (
        f"{source} has no tokenizer ({TOKENIZER_FILE} not found). An UltraFastBERT folder needs the tokenizer files of "
        f"the model it came from. For the published model, load its tokenizer from the Hub "
        f"(AutoTokenizer.from_pretrained({PUBLISHED_MODEL_ID!r})) and save it into the folder with "
        f".save_pretrained({str(source)!r}); `hf-fff convert SRC DST` copies SRC's tokenizer files into DST."
    )


class UltraFastBertTokenizerFast(PreTrainedTokenizerFast):
    """PreTrainedTokenizerFast on the folder's `tokenizer.json`; an OSError naming the folder when it has none."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *init_inputs, **kwargs):
        location = {name: kwargs[name] for name in _LOCATION_ARGUMENTS if kwargs.get(name) is not None}
        found = cached_file(pretrained_model_name_or_path, TOKENIZER_FILE, _raise_exceptions_for_missing_entries=False, **location)
        if found is None and not kwargs.get("tokenizer_file"):
            raise OSError(missing_tokenizer_message(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)
