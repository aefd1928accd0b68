"""Streaming DiLoCo's fragments: how the parameter tensors are split."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "torch_ext", "python"))
from strait.diloco import split_fragments  # noqa: E402


def test_every_tensor_is_in_exactly_one_fragment_in_model_order():
    sizes = [5, 100, 7, 64, 64, 3, 1000, 2]
    groups = split_fragments(sizes, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(g == sorted(g) and g for g in groups)


def test_fragments_are_balanced_by_size():
    sizes = [4096, 64, 4096, 64, 4096, 64, 4096, 64]  # weights and biases of four layers
    groups = split_fragments(sizes, 4)
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert loads == [4160] * 4, loads


def test_one_fragment_is_the_whole_model():
    assert split_fragments([3, 1, 2], 1) == [[0, 1, 2]]


def test_more_fragments_than_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="fragments = 4, but the model has only 3 parameter tensors"):
        split_fragments([3, 1, 2], 4)


def test_empty_tensors_do_not_leave_a_fragment_empty():
    assert split_fragments([5, 0, 0], 3) == [[0], [1], [2]]
