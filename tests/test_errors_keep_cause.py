"""Errors keep their cause: only the error a case expects becomes a message, anything else
(out of memory, a bug) propagates, and what is recovered from is logged."""

from __future__ import annotations

import logging

import pytest
import torch

from families import tiny_demo_model as tiny

from tailor_ui.errors import UserError
from tailor_ui.training.dowser import dowser_scores, self_generated_prompts


def _failing_generate(error: Exception):
    def generate(*_args, **_kwargs):
        raise error
    return generate


def test_a_model_that_needs_its_image_is_told_so_with_the_cause_kept(monkeypatch):
    model, processor = tiny()
    missing = TypeError("forward() missing 1 required positional argument: 'pixel_values'")
    monkeypatch.setattr(model, "generate", _failing_generate(missing))
    with pytest.raises(UserError, match="cannot generate without an image") as caught:
        self_generated_prompts(model, processor, 2, length=6, batch_size=2)
    assert caught.value.__cause__ is missing


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied")])
def test_out_of_memory_or_a_bug_is_not_called_a_missing_image(monkeypatch, error):
    model, processor = tiny()
    monkeypatch.setattr(model, "generate", _failing_generate(error))
    with pytest.raises(type(error)) as caught:
        self_generated_prompts(model, processor, 2, length=6, batch_size=2)
    assert caught.value is error


def test_an_unreadable_score_cache_is_logged_and_probed_again(tmp_path, caplog):
    model, processor = tiny()
    options = dict(K=2, M=1, batch_size=2, prompt_length=6, cache=tmp_path)
    first = dowser_scores(model, processor, **options)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="tailor_ui.training.dowser"):
        again = dowser_scores(model, processor, **options)
    assert not again.meta["cached"] and again.meta["key"] == first.meta["key"]
    assert any("unreadable, probing again" in r.getMessage() and str(cached) in r.getMessage()
               for r in caplog.records)
