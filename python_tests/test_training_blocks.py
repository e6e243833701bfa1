"""Anchors, block inputs and the block attention mask: the training forward over all blocks
of a sequence must compute exactly what inference computes for each block on its own."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.training.blocks import block_attention_mask, build_blocks, sample_anchors

B, MASK, H = 4, 99, 32


def _draft(fusion: str) -> DFlareDraftModel:
    """A 2-layer draft with fixed random weights for a tiny Llama-shaped target."""
    target = LlamaConfig(
        vocab_size=128,
        hidden_size=H,
        intermediate_size=2 * H,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config = DraftConfig.for_target(target, 2, fusion=fusion, block_size=B, mask_token_id=5)
    return DFlareDraftModel(config, generator=torch.Generator().manual_seed(0)).eval()


def _loss_masks() -> torch.Tensor:
    """Right-padded sequences: a prompt, a response (the loss mask), then padding."""
    masks = torch.zeros(6, 40, dtype=torch.bool)
    for row, (prompt, response) in enumerate([(5, 30), (10, 1), (0, 40), (3, 2), (20, 0), (7, 9)]):
        masks[row, prompt : prompt + response] = True
    return masks


def test_anchors_stay_inside_the_loss_mask():
    g = torch.Generator().manual_seed(0)
    masks = _loss_masks()
    for _ in range(20):
        anchors, valid = sample_anchors(masks, 8, g)
        for row in range(masks.shape[0]):
            candidates = {a for a in range(39) if masks[row, a] and masks[row, a + 1]}
            picked = anchors[row][valid[row]].tolist()
            assert set(picked) <= candidates  # inside the mask, with a label after them
            assert len(set(picked)) == len(picked) == min(8, len(candidates))
            assert picked == sorted(picked)
            assert not valid[row, len(picked) :].any()


def test_block_inputs_and_labels():
    ids = torch.arange(100, 120)[None]
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 5:18] = True
    anchors, valid = torch.tensor([[6, 16, 0]]), torch.tensor([[True, True, False]])
    blocks = build_blocks(ids, mask, anchors, valid, B, MASK)
    assert blocks.token_ids.tolist() == [
        [106, MASK, MASK, MASK, 116, MASK, MASK, MASK, 100, MASK, MASK, MASK]
    ]
    assert blocks.positions.tolist() == [[6, 7, 8, 9, 16, 17, 18, 19, 0, 1, 2, 3]]
    assert blocks.labels.tolist() == [[[107, 108, 109], [117, 0, 0], [0, 0, 0]]]
    assert blocks.valid.tolist() == [[[True] * 3, [True, False, False], [False] * 3]]
    # DFly's teacher forcing: the text token before each slot's label (the anchor at slot 0).
    assert blocks.prev_token_ids.tolist() == [
        [106, 106, 107, 108, 116, 116, 117, 118, 100, 100, 101, 102]
    ]


def test_block_labels_follow_the_target():
    """Target-labelled text: block position k is labelled with the target's token after
    x_0..x_{a+k-1} while the text agrees with the target's greedy tokens before it; the first
    disagreeing position keeps its (target) label, the rest of the block has none."""
    ids = torch.arange(100, 120)[None]
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 5:18] = True
    target = torch.where(mask, ids, -1)
    target[0, 8] = 55  # the target would not write x_8: disagrees there
    target[0, 12] = 66
    anchors = torch.tensor([[5, 6, 8, 10, 15]])
    every = torch.ones_like(anchors, dtype=torch.bool)
    blocks = build_blocks(ids, mask, anchors, every, B, MASK, target)
    assert blocks.labels.tolist() == [
        [[106, 107, 55], [107, 55, 0], [109, 110, 111], [111, 66, 0], [116, 117, 0]]
    ]
    assert blocks.valid.tolist() == [
        [[True] * 3, [True, True, False], [True] * 3, [True, True, False], [True, True, False]]
    ]
    assert blocks.label_positions[0, 0].tolist() == [6, 7, 8]
    # Text that always agrees: the text's own labels.
    same = build_blocks(ids, mask, anchors, every, B, MASK)
    agreeing = build_blocks(ids, mask, anchors, every, B, MASK, torch.where(mask, ids, -1))
    assert torch.equal(same.labels, agreeing.labels) and torch.equal(same.valid, agreeing.valid)


def test_block_mask_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    s = 30
    anchors = torch.stack([torch.randperm(s, generator=g)[:5].sort().values for _ in range(3)])
    mask = block_attention_mask(anchors, B, s)
    k = anchors.shape[1]
    expected = torch.zeros(3, 1, k * B, s + k * B, dtype=torch.bool)
    for b in range(3):
        for q in range(k * B):
            block = q // B
            for key in range(s + k * B):
                if key < s:
                    expected[b, 0, q, key] = key < anchors[b, block]
                else:
                    expected[b, 0, q, key] = (key - s) // B == block
    assert torch.equal(mask, expected)


def test_all_blocks_in_one_forward_equal_each_block_alone():
    """The training forward (one pass, block mask) against inference's view of every block:
    context = the target states strictly before the anchor, then the block by itself."""
    torch.manual_seed(0)
    for fusion in ("layerwise", "shared", "dfly"):
        draft = _draft(fusion)
        config = draft.config
        s, t = 24, config.num_captured_layers
        hidden = torch.randn(2, s, t, H)
        anchors = torch.tensor([[3, 9, 17], [1, 2, 20]])
        noise = torch.randn(2, 3 * B, H)
        blocks_pos = (anchors[:, :, None] + torch.arange(B)).flatten(1)
        positions = torch.cat([torch.arange(s).expand(2, s), blocks_pos], dim=1)
        with torch.no_grad():
            joint = draft(positions, block_attention_mask(anchors, B, s), noise, hidden)
            for b in range(2):
                for j, a in enumerate(anchors[b].tolist()):
                    rows = slice(j * B, (j + 1) * B)
                    alone = draft(
                        torch.cat([torch.arange(a), torch.arange(a, a + B)])[None],
                        None,
                        noise[b : b + 1, rows],
                        hidden[b : b + 1, :a],
                    )
                    torch.testing.assert_close(joint[b : b + 1, rows], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the BlockMask path runs on CUDA")
def test_flex_attention_block_mask_matches_sdpa_on_cuda():
    """On CUDA the mask is a flex_attention BlockMask: same draft outputs as the SDPA mask."""
    draft = _draft("layerwise").cuda()
    config = draft.config
    s, g = 40, torch.Generator().manual_seed(0)
    hidden = torch.randn(2, s, config.num_captured_layers, H, generator=g).cuda()
    anchors = torch.tensor([[3, 9, 17, 30], [1, 2, 20, 35]]).cuda()
    noise = torch.randn(2, 4 * B, H, generator=g).cuda()
    blocks_pos = (anchors[:, :, None] + torch.arange(B, device="cuda")).flatten(1)
    positions = torch.cat([torch.arange(s, device="cuda").expand(2, s), blocks_pos], dim=1)
    with torch.no_grad():
        flex = draft(positions, block_attention_mask(anchors, B, s), noise, hidden)
        sdpa = draft(positions, block_attention_mask(anchors.cpu(), B, s).cuda(), noise, hidden)
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-4)
