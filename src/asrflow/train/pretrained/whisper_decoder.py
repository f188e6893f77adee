"""Whisper's pretrained text decoder, as an auxiliary attention loss for fine-tuning its encoder with CTC.

``model: {name: whisper_encoder, decoder: trained}`` (or ``frozen``) with ``loss.decoder_weight`` w trains
``(1 - w)·CTC + w·CE(decoder)``: hybrid CTC/attention training (Kim, Hori & Watanabe 2017; ESPnet's
``ctc_weight`` is 1 - w), with the decoder Whisper was pretrained with rather than a new one. The decoder
reads the encoder's output through cross-attention, so its cross-entropy asks the encoder to stay readable
by what 680k hours taught it to read, while CTC adapts it to the task: a pull towards Whisper's own
representation, on the training audio, in function space (layer-wise LR decay and the mix by depth pull
in weight space). ``trained``: the decoder learns too (at ``pretrained_lr_scale``, frozen with the encoder
under ``freeze: all``); ``frozen``: it never changes, the stronger pull, and a cheaper step (its ~30M
parameters, most of them the 51864 x 384 token embedding, get no gradient, no allreduce and no Adam state).
It is training-only: the exported ``model.pt`` has none, inference stays greedy or LM-beam CTC.

* :class:`WhisperDecoder`: token embedding (tied with the output projection), learnt positions (448 for
  Whisper), pre-LN blocks of causal self-attention, cross-attention to the encoder's output (its padded
  frames masked), MLP; a final LayerNorm. Parameter names follow Hugging Face's ``WhisperDecoder``.
* :class:`WhisperTextTokens`: the checkpoint folder's ``tokenizer.json`` (the ``tokenizers`` library; no
  download). A transcript becomes ``<|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>`` +
  its tokens -> its tokens + ``<|endoftext|>`` (teacher forcing). Our transcripts are upper case without
  punctuation; the decoder reads them in sentence case, the way Whisper writes.
* Loaders: a Hugging Face ``openai/whisper-*`` folder and a CTranslate2 Whisper ``model.bin`` (fused
  q/k/v and k/v tensors split, the zero key biases dropped), with names and shapes checked.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from asrflow.train.features import lengths_to_mask
from asrflow.train.pretrained.checkpoints import (CheckpointError, check_shapes, read_ct2_model_bin,
                                                  read_hf_state_dict, read_json, require_path)

log = logging.getLogger(__name__)

DECODER_MODES = ("none", "frozen", "trained")
DECODER_LABEL_SMOOTHING = 0.1
MULTILINGUAL_VOCAB = 51865  # English-only Whisper models have 51864 tokens  # Whisper's and ESPnet's attention decoders train with 0.1


def decoder_mode(cfg: dict[str, Any]) -> str:
    """A whisper_encoder config's ``decoder``: "none", "frozen" or "trained" (true means "trained", false "none")."""
    if cfg.get("name", "whisper_encoder") != "whisper_encoder":
        return "none"
    value = cfg.get("decoder", "none")
    mode = {False: "none", None: "none", True: "trained"}.get(value, value) if isinstance(value, (bool, type(None))) else value
    if mode not in DECODER_MODES:
        raise ValueError(f"whisper_encoder: decoder must be one of {DECODER_MODES} (or true / false), got {value!r}")
    return mode


class WhisperDecoderLayer(nn.Module):
    """Pre-LN: x + SelfAttn(LN(x)) (causal), x + CrossAttn(LN(x), encoder output), x + FC2(GELU(FC1(LN(x))))."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int):
        super().__init__()
        from asrflow.train.pretrained.whisper import WhisperAttention

        self.self_attn = WhisperAttention(d_model, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = WhisperAttention(d_model, num_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, causal: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), memory_mask, memory=memory)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    """``(tokens (B, L), encoder output (B, T', d), its lengths) -> logits (B, L, vocab)``, teacher-forced."""

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, ffn_dim: int,
                 max_positions: int = 448):
        super().__init__()
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.embed_positions = nn.Embedding(max_positions, d_model)
        self.layers = nn.ModuleList(WhisperDecoderLayer(d_model, num_heads, ffn_dim) for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_lens: torch.Tensor) -> torch.Tensor:
        length = tokens.size(1)
        if length > self.max_positions:
            raise ValueError(f"{length} decoder tokens; Whisper's decoder has {self.max_positions} positions")
        x = self.embed_tokens(tokens) + self.embed_positions.weight[:length].to(memory.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()[None, None]
        memory_mask = lengths_to_mask(memory_lens.clamp_min(1), memory.size(1))[:, None, None, :]
        for layer in self.layers:
            x = layer(x, causal, memory, memory_mask)
        return self.layer_norm(x) @ self.embed_tokens.weight.T.to(x.dtype)  # the output projection is tied


class WhisperTextTokens:
    """Transcripts -> teacher-forcing (inputs, targets) with the checkpoint's own tokenizer and prompt."""

    def __init__(self, tokenizer_json: Path, max_positions: int, vocab_size: int):
        from tokenizers import Tokenizer

        self.path = require_path(tokenizer_json, "the Whisper checkpoint's tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.max_positions = max_positions

        def special(name: str) -> int | None:
            return self.tokenizer.token_to_id(name)

        sot, eot, no_ts = special("<|startoftranscript|>"), special("<|endoftext|>"), special("<|notimestamps|>")
        if sot is None or eot is None or no_ts is None:
            raise CheckpointError(f"{self.path}: not a Whisper tokenizer (no <|startoftranscript|>, <|endoftext|> "
                                  "or <|notimestamps|> token)")
        # A multilingual checkpoint's prompt names the language and the task; an English-only one (51864
        # tokens; its tokenizer has the language tokens too, unused) has neither: openai/whisper's own rule.
        multilingual = vocab_size >= MULTILINGUAL_VOCAB
        if multilingual and (special("<|en|>") is None or special("<|transcribe|>") is None):
            raise CheckpointError(f"{self.path}: a multilingual Whisper vocabulary without <|en|> or <|transcribe|>")
        self.prompt = [sot, special("<|en|>"), special("<|transcribe|>"), no_ts] if multilingual else [sot, no_ts]
        self.eot = eot

    def text_ids(self, text: str) -> list[int]:
        sentence = text.strip().lower()
        sentence = sentence[:1].upper() + sentence[1:]
        return self.tokenizer.encode(" " + sentence, add_special_tokens=False).ids

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, L) padded with <|endoftext|>, targets (B, L) padded with -100): the prompt and the text
        in, the text and <|endoftext|> out; the prompt's own positions predict nothing but the first token."""
        room = self.max_positions - len(self.prompt)
        rows = []
        for text in texts:
            ids = self.text_ids(text)[:room]
            rows.append((self.prompt + ids, [-100] * (len(self.prompt) - 1) + ids + [self.eot]))
        length = max(len(i) for i, _ in rows)
        inputs = torch.full((len(rows), length), self.eot, dtype=torch.long)
        targets = torch.full((len(rows), length), -100, dtype=torch.long)
        for r, (i, t) in enumerate(rows):
            inputs[r, :len(i)] = torch.tensor(i)
            targets[r, :len(t)] = torch.tensor(t)
        return inputs, targets


def decoder_loss(decoder: WhisperDecoder, tokens: WhisperTextTokens, texts: Sequence[str], memory: torch.Tensor,
                 memory_lens: torch.Tensor) -> torch.Tensor:
    """Label-smoothed cross-entropy of the teacher-forced decoder, the mean over the batch's target tokens."""
    inputs, targets = tokens.batch(texts)
    logits = decoder(inputs.to(memory.device), memory, memory_lens.to(memory.device))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.to(memory.device).flatten(), ignore_index=-100,
                           label_smoothing=DECODER_LABEL_SMOOTHING)


# ------------------------------------------------------------------------------------------------ loading

def _ct2_layer_names() -> dict[str, str]:
    """A decoder block's CTranslate2 names: the encoder block's (self-attention, MLP) plus the cross-attention's."""
    from asrflow.train.pretrained.whisper import _CT2_LAYER_NAMES as ENCODER_BLOCK

    return {**ENCODER_BLOCK,
            "attention/layer_norm/gamma": "encoder_attn_layer_norm.weight",
            "attention/layer_norm/beta": "encoder_attn_layer_norm.bias",
            "attention/linear_0/weight": "encoder_attn.q_proj.weight",
            "attention/linear_0/bias": "encoder_attn.q_proj.bias",
            "attention/linear_2/weight": "encoder_attn.out_proj.weight",
            "attention/linear_2/bias": "encoder_attn.out_proj.bias"}


_CT2_TOP_NAMES = {
    "decoder/embeddings/weight": "embed_tokens.weight",
    "decoder/position_encodings/encodings": "embed_positions.weight",
    "decoder/layer_norm/gamma": "layer_norm.weight", "decoder/layer_norm/beta": "layer_norm.bias",
}
_CT2_FUSED_CROSS_ATTENTION = {
    "attention/linear_1/weight": ["encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight"],
    "attention/linear_1/bias": [None, "encoder_attn.v_proj.bias"],
}
# CTranslate2's option scalars (activation, alibi, pre_norm ...; versions add more) and alignment metadata
# are not weights; those that would change what a Whisper decoder computes must hold Whisper's values
_CT2_REQUIRED_OPTIONS = {"decoder/alibi": 0, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0}
_CT2_IGNORED = {"decoder/alignment_heads", "decoder/projection/weight", "decoder/num_heads"}


def _ct2_decoder(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from asrflow.train.pretrained.whisper import _CT2_FUSED_SELF_ATTENTION, rename_ct2_variables

    model = read_ct2_model_bin(path, keep=lambda n: n.startswith("decoder/"))
    where, vs = model["path"], model["variables"]
    if "decoder/embeddings/weight" not in vs or "decoder/num_heads" not in vs:
        raise CheckpointError(f"{where}: no Whisper decoder (expected decoder/embeddings/weight and decoder/num_heads)")
    if any(n.endswith("weight_scale") for n in vs):
        raise CheckpointError(f"{where}: quantized decoder weights; expected float32/float16/bfloat16")
    for name, want in _CT2_REQUIRED_OPTIONS.items():
        if name in vs and int(vs[name]) != want:
            raise CheckpointError(f"{where}: {name} is {int(vs[name])}; a Whisper decoder has {want}")
    weights = {n: v for n, v in vs.items() if n not in _CT2_IGNORED}
    out, layers, unknown = rename_ct2_variables(where, weights, "decoder", _CT2_TOP_NAMES, _ct2_layer_names(),
                                                {**_CT2_FUSED_SELF_ATTENTION, **_CT2_FUSED_CROSS_ATTENTION})
    if unknown:
        raise CheckpointError(f"{where}: unexpected decoder variable(s) {sorted(unknown)[:6]}; expected a plain "
                              "Whisper decoder (ctranslate2's WhisperDecoderSpec)")
    emb = out["embed_tokens.weight"]
    arch = {"vocab_size": int(emb.shape[0]), "d_model": int(emb.shape[1]), "num_layers": len(layers),
            "num_heads": int(vs["decoder/num_heads"]), "ffn_dim": int(out["layers.0.fc1.weight"].shape[0]),
            "max_positions": int(out["embed_positions.weight"].shape[0])}
    return arch, out


def _hf_decoder(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    folder = path if path.is_dir() else path.parent
    cfg = read_json(folder / "config.json", "a Hugging Face Whisper config.json")
    state = read_hf_state_dict(path)
    prefix = "model.decoder."
    if prefix + "embed_tokens.weight" not in state:
        raise CheckpointError(f"{path}: no Whisper decoder weights (looked for {prefix}embed_tokens.weight)")
    out = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    out = {k: v for k, v in out.items() if not re.fullmatch(r"layers\.\d+\.(self_attn|encoder_attn)\.k_proj\.bias", k)}
    arch = {"vocab_size": int(cfg["vocab_size"]), "d_model": int(cfg["d_model"]),
            "num_layers": int(cfg["decoder_layers"]), "num_heads": int(cfg["decoder_attention_heads"]),
            "ffn_dim": int(cfg["decoder_ffn_dim"]), "max_positions": int(cfg.get("max_target_positions", 448))}
    return arch, out


def _read_decoder(checkpoint: str | Path, fmt: str) -> tuple[Path, str, dict[str, int], dict[str, torch.Tensor]]:
    from asrflow.train.pretrained.whisper import detect_format

    p = require_path(checkpoint, "a Hugging Face or CTranslate2 Whisper folder with its decoder")
    fmt = detect_format(p) if fmt == "auto" else fmt
    arch, state = _ct2_decoder(p) if fmt == "ctranslate2" else _hf_decoder(p)
    return p, fmt, arch, state


def _text_tokens(p: Path, arch: dict[str, int]) -> WhisperTextTokens:
    folder = p if p.is_dir() else p.parent
    return WhisperTextTokens(folder / "tokenizer.json", arch["max_positions"], arch["vocab_size"])


def whisper_text_tokens(checkpoint: str | Path, fmt: str = "auto") -> WhisperTextTokens:
    """A Whisper folder's tokenizer and prompt, sized by its own decoder (positions, vocabulary: English-only
    or multilingual), for decoding with the checkpoint itself (CTranslate2's ``generate``)."""
    p, _, arch, _ = _read_decoder(checkpoint, fmt)
    return _text_tokens(p, arch)


def load_whisper_decoder(checkpoint: str | Path, fmt: str, d_model: int) -> tuple[WhisperDecoder, WhisperTextTokens]:
    """The pretrained decoder of a Hugging Face or CTranslate2 Whisper folder, loaded and checked, and its
    tokenizer (``tokenizer.json`` beside the weights)."""
    p, fmt, arch, state = _read_decoder(checkpoint, fmt)
    if arch["d_model"] != d_model:
        raise CheckpointError(f"{p}: the decoder's width is {arch['d_model']}, the encoder's {d_model}")
    decoder = WhisperDecoder(**arch)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    check_shapes(p, expected, state, "a Whisper decoder of " + ", ".join(f"{k}={v}" for k, v in arch.items()))
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{p}: unexpected decoder tensor(s) {extra[:6]}")
    decoder.load_state_dict(state)
    tokens = _text_tokens(p, arch)
    log.info("whisper_encoder: loaded the %d-layer decoder (%d tensors, vocabulary %d) from %s (%s)",
             arch["num_layers"], len(state), arch["vocab_size"], p, fmt)
    return decoder, tokens


def decoder_to_ct2_variables(decoder: WhisperDecoder, num_heads: int) -> dict[str, Any]:
    """The inverse of the CTranslate2 reader: ``decoder/*`` variables (fused projections, zero key biases), for
    :func:`~asrflow.train.pretrained.checkpoints.write_ct2_model_bin` (tests write tiny models)."""
    sd = {k: v.detach().float() for k, v in decoder.state_dict().items()}
    out: dict[str, Any] = {ct2: sd[ours] for ct2, ours in _CT2_TOP_NAMES.items()}
    out["decoder/num_heads"] = int(num_heads)
    for i in range(len(decoder.layers)):
        pre, ct2 = f"layers.{i}.", f"decoder/layer_{i}/"
        for name, ours in _ct2_layer_names().items():
            out[ct2 + name] = sd[pre + ours]
        zeros = torch.zeros_like(sd[pre + "self_attn.q_proj.bias"])
        out[ct2 + "self_attention/linear_0/weight"] = torch.cat([sd[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[ct2 + "self_attention/linear_0/bias"] = torch.cat([sd[pre + "self_attn.q_proj.bias"], zeros,
                                                              sd[pre + "self_attn.v_proj.bias"]])
        out[ct2 + "attention/linear_1/weight"] = torch.cat([sd[pre + f"encoder_attn.{n}_proj.weight"] for n in "kv"])
        out[ct2 + "attention/linear_1/bias"] = torch.cat([zeros, sd[pre + "encoder_attn.v_proj.bias"]])
    return out
