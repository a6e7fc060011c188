"""hf_fff: UltraFastBERT as a first-class transformers model, with fast FFF kernels.

The native sources in cuda/ ship inside the wheel as the package `hf_fff.csrc` (package data) and are
JIT-compiled on first use, so the wheel itself is pure Python; model_cards/ ships as `hf_fff.model_cards`.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# One version: hf_fff.__version__ (the launcher reads it back from the installed metadata).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "hf_fff" / "__init__.py").read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="hf_fff",
    version=VERSION,
    description="UltraFastBERT (fast feedforward networks) for HuggingFace transformers, with CPU and CUDA conditional-matmul kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # hf_fff_cli: the console script's module, outside the package so that --help and --version answer
    # without importing transformers (see its docstring).
    py_modules=["hf_fff_cli"],
    packages=["hf_fff", "hf_fff.backends", "hf_fff.tools", "hf_fff.csrc", "hf_fff.model_cards"],
    package_dir={"hf_fff.csrc": "cuda", "hf_fff.model_cards": "model_cards"},
    package_data={"hf_fff.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"], "hf_fff.model_cards": ["*.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "ninja",
        "pyyaml>=5.1",
    ],
    extras_require={
        # The test extra installs the optional integrations so that their tests run in CI instead of skipping.
        "test": ["pytest>=8", "tokenizers>=0.20", "matplotlib>=3.7", "accelerate>=1.1", "sentence-transformers>=3.0", "peft>=0.13"],
        "train": ["accelerate>=1.1"],  # transformers' Trainer needs it
        "plot": ["matplotlib>=3.7"],
        "st": ["sentence-transformers>=3.0"],
        "peft": ["peft>=0.13"],
    },
    entry_points={"console_scripts": ["hf-fff=hf_fff_cli:main"]},
)
