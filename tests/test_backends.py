"""hf_fff.backends: the forced choice is per thread (use_backend) over per process (set_backend / HF_FFF_BACKEND)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import hf_fff
from hf_fff import backends


@pytest.fixture(autouse=True)
def _default_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    hf_fff.set_backend(None)
    yield
    hf_fff.set_backend(None)


def _run_in_thread(target) -> tuple[threading.Thread, list]:
    errors = []

    def guarded():
        try:
            target()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    thread = threading.Thread(target=guarded)
    thread.start()
    return thread, errors


def test_overlapping_blocks_in_two_threads_leave_the_default_in_force():
    """A enters, B enters, A leaves, B leaves: with one process-wide variable B restored A's choice."""
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with hf_fff.use_backend("masked"):
            a_entered.set()
            assert b_entered.wait(30)
            seen["a inside"] = backends.resolve("cpu")[0]
        seen["a after"] = backends.requested_backend()
        a_left.set()

    def thread_b():
        assert a_entered.wait(30)
        with hf_fff.use_backend("reference"):
            b_entered.set()
            assert a_left.wait(30)
            seen["b inside"] = backends.resolve("cpu")[0]
        seen["b after"] = backends.requested_backend()

    (a, a_errors), (b, b_errors) = _run_in_thread(thread_a), _run_in_thread(thread_b)
    assert b_entered.wait(30)
    seen["main during both"] = backends.requested_backend()
    a.join(30), b.join(30)
    assert a_errors == [] and b_errors == []
    assert seen == {"a inside": "masked", "b inside": "reference", "a after": "auto", "b after": "auto", "main during both": "auto"}
    assert backends.requested_backend() == "auto"
    assert backends.resolve("cpu")[0] != "masked"  # the masked baseline is never the automatic choice


def test_the_resolve_cache_follows_each_threads_choice():
    x, w_in, b_in, w_out = torch.randn(3, 8), torch.randn(7, 8), torch.randn(7), torch.randn(7, 8)
    inside, outside = threading.Event(), threading.Event()
    names = {}

    def forced_thread():
        with hf_fff.use_backend("masked"):
            names["thread"] = backends.resolve("cpu")[0]
            hf_fff.fast_feedforward(x, w_in, b_in, w_out, 2)
            inside.set()
            assert outside.wait(30)
            names["thread again"] = backends.resolve("cpu")[0]

    thread, errors = _run_in_thread(forced_thread)
    assert inside.wait(30)
    names["main"] = backends.resolve("cpu")[0]  # the cached choice of the other thread must not leak here
    outside.set()
    thread.join(30)
    assert errors == []
    assert names["thread"] == names["thread again"] == "masked" and names["main"] != "masked"


def test_a_block_overrides_set_backend_in_its_thread_only():
    entered, changed = threading.Event(), threading.Event()
    seen = {}

    def forced_thread():
        with hf_fff.use_backend("masked"):
            entered.set()
            assert changed.wait(30)
            seen["inside"] = backends.requested_backend()
        seen["after"] = backends.requested_backend()

    thread, errors = _run_in_thread(forced_thread)
    assert entered.wait(30)
    hf_fff.set_backend("reference")
    changed.set()
    thread.join(30)
    assert errors == []
    assert seen == {"inside": "masked", "after": "reference"}
    assert backends.requested_backend() == "reference"


def test_nested_blocks_restore_the_outer_choice(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with hf_fff.use_backend("masked"):
        with hf_fff.use_backend("reference"):
            assert backends.resolve("cpu")[0] == "reference"
        assert backends.resolve("cpu")[0] == "masked"
        with hf_fff.use_backend(None):  # back to the process-wide choice inside a block
            assert backends.requested_backend() == "reference"
    assert backends.requested_backend() == "reference"
    with pytest.raises(ValueError, match="unknown FFF backend"):
        with hf_fff.use_backend("nope"):
            pass


def test_environment_variable_changes_take_effect_at_the_next_call(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("cpu")[0] != "masked"  # caches the automatic choice
    for value in ("masked", " Reference ", "masked"):
        monkeypatch.setenv(backends.ENV_VAR, value)
        assert backends._environment_choice() == os.environ.get(backends.ENV_VAR) == value
        assert backends.resolve("cpu")[0] == value.strip().lower()
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends._environment_choice() is None
    assert backends.resolve("cpu")[0] != "masked"
