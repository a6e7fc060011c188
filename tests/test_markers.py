"""The `gpu` marker is added by tests/conftest.py to every test that skips without a GPU."""

from __future__ import annotations

import pytest


@pytest.mark.skipif(False, reason="needs a CUDA GPU")  # never skips: the reason alone decides the marker
def test_a_test_whose_skip_reason_names_the_gpu_is_marked_gpu(request):
    assert request.node.get_closest_marker("gpu") is not None


@pytest.mark.skipif(False, reason="needs a machine without CUDA")
def test_other_skip_reasons_do_not_mark_gpu(request):
    assert request.node.get_closest_marker("gpu") is None
