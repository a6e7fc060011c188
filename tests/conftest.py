"""Shared pytest fixtures.

Keep each group together, under its own header.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# ====================================================================================================
# Hub isolation, fake Hub, conversion fixtures (conversion and publishing: test_convert, test_hub,
# test_remote_code)
# ====================================================================================================

# Before anything imports huggingface_hub (which reads these at import time): a fresh HF home for the
# whole session, so no test reads or writes the real user's cache or stored token, and no real token
# from the environment can reach a server.
_HF_HOME = Path(tempfile.mkdtemp(prefix="hf_fff-tests-hf-home-"))
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_CACHE"] = str(_HF_HOME / "hub")
os.environ["HF_MODULES_CACHE"] = str(_HF_HOME / "modules")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
os.environ.pop("HF_TOKEN_PATH", None)

import pytest  # noqa: E402

from _model_helpers import FIXTURES as FIXTURES_DIR  # noqa: E402  (the small reference fixtures, tests/fixtures)
from fake_hub import FakeHub  # noqa: E402

HUB_USER = "tester"
HUB_TOKEN = "hf_fake_write_token_0123456789"


@pytest.fixture(scope="session", autouse=True)
def _hf_home_is_sandboxed():
    """Also patch huggingface_hub's constants, in case a plugin imported it before this file ran."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HOME", str(_HF_HOME))
        patch.setattr(constants, "HF_HUB_CACHE", str(_HF_HOME / "hub"))
        patch.setattr(constants, "HF_TOKEN_PATH", str(_HF_HOME / "token"))
        patch.setattr(constants, "HF_STORED_TOKENS_PATH", str(_HF_HOME / "stored_tokens"))
        yield
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def _point_hub_at(monkeypatch, url: str, cache: Path) -> None:
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    # transformers keeps one HfApi per process, built with the endpoint of its first use.
    monkeypatch.setattr(transformers_hub, "_hf_api", None)

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture(params=["lfs", "regular"])
def fake_hub(request, monkeypatch, tmp_path):
    """A FakeHub on 127.0.0.1 with huggingface_hub pointed at it and a fresh download cache.

    "lfs": safetensors go through the LFS batch API (Xet disabled with its documented switch).
    "regular": every file is committed inline, the path upload_folder takes with hf_xet installed.
    Tokens: HUB_TOKEN belongs to HUB_USER. No token is set; use the `hub_token` fixture.
    """
    from huggingface_hub import constants

    lfs = request.param == "lfs"
    with FakeHub({HUB_TOKEN: HUB_USER}, lfs=lfs) as hub:
        _point_hub_at(monkeypatch, hub.url, tmp_path / "hf-cache")
        if lfs:
            monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
            monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield hub


@pytest.fixture
def lfs_hub(monkeypatch, tmp_path):
    """The "lfs" FakeHub only, for tests that need one configuration."""
    from huggingface_hub import constants

    with FakeHub({HUB_TOKEN: HUB_USER}, lfs=True) as hub:
        _point_hub_at(monkeypatch, hub.url, tmp_path / "hf-cache")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield hub


@pytest.fixture
def hub_token(monkeypatch):
    """HF_TOKEN set to the fake hub's write token (the usual way a token reaches huggingface_hub)."""
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    return HUB_TOKEN


@pytest.fixture
def fresh_hf_cache(monkeypatch, tmp_path):
    """Point downloads at a new, empty cache (as a fresh machine would have)."""
    from huggingface_hub import constants

    cache = tmp_path / f"fresh-cache-{len(list(tmp_path.iterdir()))}"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from _model_helpers import train_tokenizer

    return train_tokenizer()


def _crammed_copy(name: str, destination: Path, tokenizer) -> Path:
    """A writable copy of a crammed fixture in the Hub layout, with tokenizer files beside it."""
    folder = destination / name
    folder.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURES_DIR / name / file, folder / file)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["crammed-tiny-1x3", "crammed-tiny-4x2"])
def crammed_tiny(request, tmp_path, tiny_tokenizer) -> Path:
    """Each tiny crammedBERT fixture, copied with a tokenizer (the fixtures ship none)."""
    return _crammed_copy(request.param, tmp_path / "src", tiny_tokenizer)


@pytest.fixture
def crammed_1x3(tmp_path, tiny_tokenizer) -> Path:
    return _crammed_copy("crammed-tiny-1x3", tmp_path / "src", tiny_tokenizer)


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory, tiny_tokenizer) -> Path:
    """crammed-tiny-1x3 converted to the native format once per session (read-only for tests)."""
    from hf_fff.tools.convert import convert

    base = tmp_path_factory.mktemp("converted")
    source = _crammed_copy("crammed-tiny-1x3", base / "src", tiny_tokenizer)
    convert(source, base / "UltraFastBERT-tiny-1x3")
    return base / "UltraFastBERT-tiny-1x3"


# ==================================================== end of the conversion and publishing group ===


# ====================================================================================================
# The compiled CPU extension (test_cpu_backend, test_dropout)
# ====================================================================================================


@pytest.fixture(scope="session")
def cpp_module():
    """The compiled extension, built once per session (and reused from the on-disk cache after that)."""
    from hf_fff.backends import cpu

    module = cpu.load_module()
    if module is None:
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler here; the fallback is covered by test_extension.py")
        pytest.fail("a C++ compiler is available but the fff_cpu extension did not build (see the warning)")
    return module


# ====================================================================================================
# Markers (registered in pytest.ini): `gpu` and `slow`
# ====================================================================================================


def _skip_reason_names_the_gpu(item: pytest.Item) -> bool:
    return any("GPU" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    """Mark `gpu` every test that skips without a GPU (a skipif whose reason names the GPU, e.g. "needs a CUDA
    GPU"), so that `-m "not gpu"` and `-m gpu` select by hardware without each test repeating the marker."""
    for item in items:
        if _skip_reason_names_the_gpu(item) and not item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.gpu)
