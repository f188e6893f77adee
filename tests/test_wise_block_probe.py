"""scripts/wise_block_probe.py: its depths are the ones pretrained_share_blocks mixes, and one share at every
depth is the rule's whole-encoder mix."""
import importlib.util
from pathlib import Path

import torch

from asrflow.train.averaging import average_models, encoder_blocks, mix_with_pretrained, pretrained_part
from tests.train.test_averaging import write_finetuned_whisper

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wise_block_probe.py"


def load_script():
    spec = importlib.util.spec_from_file_location("wise_block_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_depths_and_mixes_agree_with_pretrained_share_blocks(tmp_path):
    probe = load_script()
    path, _ = write_finetuned_whisper(tmp_path)
    ckpt = average_models([path], min_parents=1)
    n, pretrained = encoder_blocks(ckpt), pretrained_part(ckpt)
    depth = probe.depth_of(ckpt)
    assert set(depth) == set(pretrained) and sorted(set(depth.values())) == list(range(n + 2))
    assert {k for k, d in depth.items() if d == n + 1} == {"encoder.layer_norm.weight", "encoder.layer_norm.bias"}
    for k in range(n):  # the stem and the lowest k < n blocks at one share: the rule's mix of depth k
        shares = [0.3] * (k + 1) + [0.0] * (n + 1 - k)
        ours = probe.mix_by_depth(ckpt, pretrained, depth, shares)["model"]
        rules = mix_with_pretrained(ckpt, pretrained_part(ckpt, k), 0.3)["model"]
        assert all(torch.equal(ours[name], rules[name]) for name in ckpt["model"])
    # one share at every depth, the top too: the rule's whole-encoder mix (k = n, or no pretrained_share_blocks)
    everywhere = probe.mix_by_depth(ckpt, pretrained, depth, [0.3] * (n + 2))["model"]
    whole = mix_with_pretrained(ckpt, pretrained, 0.3)["model"]
    assert all(torch.equal(everywhere[name], whole[name]) for name in ckpt["model"])
