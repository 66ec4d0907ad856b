"""XᵀX on the upper triangle, mirrored: the full product's sums bit for bit, at widths
that split into blocks evenly and unevenly."""

import pytest
import torch

from tailor_ui.gram import BLOCK, add_gram_upper, block_bounds, mirror_upper


@pytest.mark.parametrize("width", [1, 64, BLOCK + 1, 700, 1152, 2048])
def test_block_bounds_cover_the_columns_in_near_equal_blocks(width):
    bounds = block_bounds(width)
    sizes = [e - a for a, e in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == width
    assert max(sizes) - min(sizes) <= 1
    assert len(sizes) == 1 or min(sizes) >= BLOCK // 2  # no sliver of a block row


@pytest.mark.parametrize("width", [64, BLOCK + 1, 1152, 2048])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_summed_upper_triangle_mirrored_equals_the_full_products(width, rows):
    gen = torch.Generator().manual_seed(width * 1000 + rows)
    batches = [torch.randn(rows, width, generator=gen) for _ in range(3)]
    full = batches[0].T @ batches[0]
    for x in batches[1:]:
        full.add_(x.T @ x)
    acc = torch.zeros(width, width)
    for x in batches:
        add_gram_upper(acc, x)
    assert torch.equal(mirror_upper(acc), full)

