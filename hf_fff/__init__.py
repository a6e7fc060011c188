"""hf_fff: UltraFastBERT for HuggingFace transformers.

Importing this package registers the `ultrafastbert` model type (and the published `crammedBERT`
checkpoint layout) with transformers' Auto classes.
"""

from .backends import available_backends, set_backend, use_backend
from .ops import fast_feedforward

__version__ = "0.1.0"
