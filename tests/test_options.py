"""Option values are checked before anything runs: each problem is one line naming the flag."""
import pytest

from pipeline.run import unknown_flags


def problems(*argv):
    from pipeline.options import OptionError

    try:
        return unknown_flags(list(argv))
    except OptionError as err:
        return [str(err)]


@pytest.mark.parametrize("flag, words", [
    ("--writer_memory_gib=0", ["--writer_memory_gib", "above 0"]),
    ("--writer_memory_gib=lots", ["--writer_memory_gib", "takes a number", "'lots'"]),
    ("--writer_memory_gib=inf", ["--writer_memory_gib", "finite"]),
    ("--writer_threads=0", ["--writer_threads", "at least 1"]),
    ("--batch_size=two", ["--batch_size", "whole number"]),
])
def test_bad_values_are_named(flag, words):
    found = problems("--output=/tmp/x", flag)
    assert len(found) == 1 and all(word in found[0] for word in words), found


def test_good_values_and_typos():
    assert problems("--output=/tmp/x", "--writer_memory_gib=0.5", "--writer_threads=3") == []
    found = problems("--output=/tmp/x", "--writer_memory=4")
    assert len(found) == 1 and "--writer_memory_gib" in found[0], found


def test_attention_choices_are_the_models():
    from model.qwen2 import ATTENTION_IMPLEMENTATIONS
    from pipeline.options import ATTENTION_CHOICES

    assert set(ATTENTION_CHOICES) == set(ATTENTION_IMPLEMENTATIONS)
