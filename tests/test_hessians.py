"""`collect_hessians` against 2·XᵀX/n computed here from inputs recorded by a plain hook.

A tiny model with the call signature of the real ones (input_ids, attention_mask,
pixel_values): a vision layer whose input has the text's (batch, sequence) shape, blocks
whose q/k/v read one normalised tensor, and a counter on the later blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tailor_ui.calibration import collect_hessians
from tailor_ui.control import Cancelled

WIDTH = 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.self_attn = nn.ModuleDict({n: nn.Linear(WIDTH, WIDTH) for n in
                                        ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.norm(h)
        a = self.self_attn
        mixed = a["q_proj"](x) * a["k_proj"](x) + a["v_proj"](x)
        return h + a["o_proj"](mixed.cumsum(1))  # later tokens read earlier ones


class TinyMLLM(nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(11, WIDTH)
        self.vision_tower = nn.ModuleDict({"proj": nn.Linear(WIDTH, WIDTH)})
        self.layers = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, input_ids, attention_mask, pixel_values):
        h = self.embed_tokens(input_ids) + self.vision_tower["proj"](pixel_values)
        for block in self.layers:
            h = block(h)
        return h


def batch(ids: list[list[int]], mask: list[list[int]]) -> dict[str, torch.Tensor]:
    ids_t = torch.tensor(ids)
    return {"input_ids": ids_t, "attention_mask": torch.tensor(mask),
            "pixel_values": torch.randn(*ids_t.shape, WIDTH)}


@pytest.fixture
def batches():
    torch.manual_seed(1)
    return [batch([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
            batch([[0, 7, 8, 9], [3, 4, 5, 6], [0, 0, 2, 1]],  # left padding
                  [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])]


def recorded_inputs(model: nn.Module, names: list[str], batches) -> dict[str, list[torch.Tensor]]:
    """Each named linear's input for every batch, recorded by a hook that only copies."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].detach().clone())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return seen


def expected_hessian(inputs: list[torch.Tensor], masks: list[torch.Tensor] | None) -> torch.Tensor:
    """2·XᵀX/n over the rows kept: every row, or the positions whose mask is 1."""
    rows = []
    for i, x in enumerate(inputs):
        if masks is not None:
            x = torch.stack([x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1])
                             if masks[i][b, t] == 1])
        rows.append(x.reshape(-1, WIDTH).double())
    x = torch.cat(rows)
    return (2 * x.T @ x / x.shape[0]).float()


QKV = [f"layers.1.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
WATCHED = ["vision_tower.proj", "layers.0.self_attn.o_proj", *QKV]


def test_hessians_equal_two_xtx_over_n_without_padding_rows(batches):
    model = TinyMLLM()
    got = collect_hessians(model, WATCHED, batches)
    inputs = recorded_inputs(model, WATCHED, batches)
    masks = [b["attention_mask"] for b in batches]
    assert set(got) == set(WATCHED)
    for name in WATCHED:
        # the vision layer's input has the text's shape but is not text: no mask applies
        want = expected_hessian(inputs[name], None if name.startswith("vision") else masks)
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-5)
    # padding matters here: counting the padded rows gives another answer
    padded = expected_hessian(inputs["layers.0.self_attn.o_proj"], None)
    assert not torch.allclose(got["layers.0.self_attn.o_proj"], padded, atol=1e-3)


def test_layers_reading_one_input_share_one_tensor(batches):
    got = collect_hessians(TinyMLLM(), QKV + ["layers.0.self_attn.o_proj"], batches)
    assert got[QKV[0]] is got[QKV[1]] is got[QKV[2]]
    assert got["layers.0.self_attn.o_proj"] is not got[QKV[0]]


def test_forward_stops_after_the_last_watched_layer(batches):
    model = TinyMLLM()
    early = collect_hessians(model, WATCHED, batches)
    assert [b.calls for b in model.layers] == [2, 2, 0]  # block 2 never ran
    full = collect_hessians(model, WATCHED, batches, stop_early=False)
    assert [b.calls for b in model.layers] == [4, 4, 2]
    for name in WATCHED:
        assert torch.equal(early[name], full[name])


def test_cancel_raises_and_removes_the_hooks(batches):
    model = TinyMLLM()
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 1  # cancel before the second batch

    with pytest.raises(Cancelled):
        collect_hessians(model, WATCHED, batches, should_stop=should_stop)
    assert model.layers[0].calls == 1
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bad_names_are_refused(batches):
    with pytest.raises(ValueError, match="layers.0.norm is not a linear layer"):
        collect_hessians(TinyMLLM(), ["layers.0.norm"], batches)
    with pytest.raises(ValueError, match="calibration never reached: layers.0.self_attn.q_proj"):
        collect_hessians(TinyMLLM(), ["layers.0.self_attn.q_proj"], [])
