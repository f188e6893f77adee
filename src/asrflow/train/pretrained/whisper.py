"""A Whisper encoder with a CTC head (``model.name: whisper_encoder``), in plain PyTorch.

* :class:`WhisperLogMel`: Whisper's own front end. 16 kHz waveforms -> log-mel (B, T, n_mels) with
  n_fft 400 (25 ms), hop 160 (10 ms), a periodic Hann window, Slaney mel filters (80 or 128), power
  spectrum, ``log10(max(mel, 1e-10))``, clamped to ``max - 8`` (the max over the utterance's real frames),
  ``(x + 4) / 4``. Frame ``t`` is centred on sample ``160 t``: the start is reflect-padded and the end
  zero-padded, which is what Whisper sees for audio zero-padded to 30 s, so real frames equal
  ``transformers.WhisperFeatureExtractor``'s and never depend on how much the batch is padded.
  An utterance of ``L`` samples has ``L // 160`` frames.
* :class:`WhisperEncoder`: conv1d(k3) + GELU, conv1d(k3, stride 2) + GELU, sinusoidal positions sliced
  to the input length (not padded to 30 s: at most ``max_positions`` = 1500 output frames, i.e. 30 s),
  pre-LN transformer blocks, a final LayerNorm. Parameter names follow Hugging Face's ``WhisperEncoder``
  (``conv1``, ``layers.{i}.self_attn.q_proj`` ...), whose state dict loads as is. With ``mask_padding``
  (default), padded frames are zeroed before each convolution and masked out of attention, so real
  output frames do not depend on the batch's padding.
* :class:`WhisperCTC`: the encoder, optional BiLSTM layers, a linear CTC head (log-softmax in fp32).
  The asrflow model interface: ``forward(feats, feat_lens, normalized=True) -> (log_probs, out_lens)``,
  ``wave_frontend`` (a :class:`WhisperLogMel`), ``cmvn = None``, ``model_config`` (the resolved,
  exportable config).

Loaders: a Hugging Face ``openai/whisper-*`` folder (config.json + model.safetensors / pytorch_model.bin)
and a CTranslate2 Whisper folder (model.bin), see :func:`load_whisper_encoder_state`.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from asrflow.train.features import lengths_to_mask, mel_band_centres_hz
from asrflow.train.pretrained.checkpoints import (
    CheckpointError,
    check_shapes,
    read_ct2_model_bin,
    read_hf_state_dict,
    read_json,
    require_path,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
LOG_FLOOR = 1e-10

ARCH_KEYS = ("n_mels", "d_model", "num_layers", "num_heads", "ffn_dim", "max_positions")
# Whisper tiny(.en)'s shape: the architecture of a randomly initialised whisper_encoder (no checkpoint).
RANDOM_INIT_ARCH = {"n_mels": 80, "d_model": 384, "num_layers": 4, "num_heads": 6, "ffn_dim": 1536,
                    "max_positions": 1500}
WHISPER_DEFAULTS: dict[str, Any] = {
    "checkpoint": None,             # a Hugging Face or CTranslate2 Whisper folder; None: random init
    "checkpoint_format": "auto",    # auto | huggingface | ctranslate2
    **{k: None for k in ARCH_KEYS},  # None: from the checkpoint (else RANDOM_INIT_ARCH)
    "dropout": 0.1,                 # before the head
    "encoder_dropout": 0.0,         # inside the encoder (Whisper: 0)
    "attention_dropout": 0.0,
    "mask_padding": True,
    "head_lstm_layers": 0,          # BiLSTM layers between encoder and head (0: linear head only)
    "head_lstm_hidden": 192,
    "freeze": "none",               # "none" | "all" (the whole encoder) | k (convolutions + first k blocks)
    "unfreeze_after_steps": 0,      # 0: never; else everything trains from this step on
    "unfreeze_warmup_steps": 0,     # W: after unfreezing, the encoder's LR ramps up over W steps
    "frozen_after_unfreeze": None,  # k: the convolutions + first k blocks stay frozen after unfreezing; None: nothing
    "pretrained_lr_scale": 0.1,     # LR multiplier of the checkpoint's parameters (the head gets 1)
    "pretrained_lr_decay": 1.0,     # layer-wise LR decay: each unit below the top x this (1: one LR for all)
    "gradient_checkpointing": False,
    # Whisper's own pretrained text decoder from the same checkpoint, as an auxiliary attention loss
    # (loss.decoder_weight; hybrid CTC/attention as ESPnet trains it): "none", "frozen" or "trained"
    # (asrflow.train.pretrained.whisper_decoder). Training only: model.pt has no decoder, inference stays CTC.
    "decoder": "none",
    # An auxiliary CTC head predicting espeak-ng phones (asrflow.phones; loss.phone_ctc_weight) on the output of
    # block k (k = num_layers: the encoder's own output, below the BiLSTM); 0: off. Phones follow the sound
    # where characters follow spelling: the encoder is asked for what any voice of a word shares.
    "phone_ctc_layer": 0,
    "phone_vocab_size": 0,          # set by the trainer from the phone lexicon
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table (length, channels): sin on the first half of channels, cos on the rest."""
    if channels % 2:
        raise ValueError(f"d_model must be even for sinusoidal positions, got {channels}")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class WhisperLogMel(nn.Module):
    """``(waves (B, S) float 16 kHz, wave_lens (B,)) -> (feats (B, T, n_mels), feat_lens = wave_lens // 160)``.

    Padded frames of the output are 0. Computed in fp32 with autocast off. Filters and window are
    non-persistent buffers (recomputed, never stored in checkpoints).
    """

    def __init__(self, n_mels: int = 80):
        super().__init__()
        if n_mels not in (80, 128):
            raise ValueError(f"Whisper's front end has 80 or 128 mel bins, got {n_mels}")
        self.n_mels = int(n_mels)
        self.sample_rate = SAMPLE_RATE
        self.hop_length = HOP_LENGTH
        self.n_fft = N_FFT
        fb = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, self.n_mels, SAMPLE_RATE,
                                                   norm="slaney", mel_scale="slaney")  # (freqs, mels)
        self.register_buffer("mel_filters", fb.T.contiguous(), persistent=False)  # (mels, freqs)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    # the features are log10 of power over 4: a gain of g dB (power x 10^(g/10)) adds g / 40
    units_per_db = 1.0 / 40.0

    def band_centres_hz(self) -> torch.Tensor:
        """Each mel band's centre frequency (Slaney mels over 0 to 8 kHz, as ``mel_filters``)."""
        return mel_band_centres_hz(self.n_mels, 0.0, SAMPLE_RATE / 2, "slaney")

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(sample_lengths, HOP_LENGTH, rounding_mode="floor").clamp_min(0)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if waves.dim() != 2:
            raise ValueError(f"expected waveforms (B, S), got shape {tuple(waves.shape)}")
        lengths = lengths.to(waves.device)
        frame_lens = self.frame_lengths(lengths)
        with torch.autocast(device_type=waves.device.type, enabled=False):
            x = waves.float().masked_fill(~lengths_to_mask(lengths, waves.size(1)), 0.0)
            half = N_FFT // 2
            x = F.pad(x, (0, half + max(0, half + 1 - x.size(1))))  # zeros after the end (as Whisper's 30 s pad)
            x = F.pad(x[:, None], (half, 0), mode="reflect")[:, 0]  # centre frame 0 on sample 0
            spec = torch.stft(x, N_FFT, HOP_LENGTH, window=self.window, center=False, return_complex=True)
            n = int(frame_lens.max()) if frame_lens.numel() else 0
            if n == 0:  # only clips shorter than one hop: no frames
                return torch.zeros(waves.size(0), 0, self.n_mels, device=waves.device), frame_lens
            power = spec[..., :n].abs() ** 2  # (B, freqs, T)
            mel = torch.matmul(self.mel_filters, power)  # (B, mels, T)
            logmel = torch.log10(mel.clamp_min(LOG_FLOOR)).transpose(1, 2)  # (B, T, mels)
            real = lengths_to_mask(frame_lens, n)  # (B, T)
            peak = logmel.masked_fill(~real[:, :, None], float("-inf")).amax(dim=(1, 2), keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            logmel = (torch.maximum(logmel, peak - 8.0) + 4.0) / 4.0
            logmel = logmel.masked_fill(~real[:, :, None], 0.0)
        return logmel, frame_lens


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)  # a key bias cancels in the softmax
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over ``x``, or (the decoder's cross-attention) attention from ``x`` to ``memory``."""
        b, t, d = x.shape
        kv = x if memory is None else memory

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, y.size(1), self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.head_dim ** -0.5)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + FC2(GELU(FC1(LN(x))))."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.self_attn = WhisperAttention(d_model, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), attn_mask))
        h = self.fc2(self.dropout(F.gelu(self.fc1(self.final_layer_norm(x)))))
        return x + self.dropout(h)


class WhisperEncoder(nn.Module):
    """(feats (B, T, n_mels), lens) -> (hidden (B, ceil(T / 2), d_model), out_lens). Names as Hugging Face's."""

    def __init__(self, n_mels: int = 80, d_model: int = 384, num_layers: int = 4, num_heads: int = 6,
                 ffn_dim: int = 1536, max_positions: int = 1500, dropout: float = 0.0,
                 attention_dropout: float = 0.0, mask_padding: bool = True, gradient_checkpointing: bool = False):
        super().__init__()
        self.n_mels, self.d_model, self.max_positions = n_mels, d_model, max_positions
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("embed_positions", sinusoids(max_positions, d_model))
        self.layers = nn.ModuleList(WhisperEncoderLayer(d_model, num_heads, ffn_dim, dropout, attention_dropout)
                                    for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.mask_padding = mask_padding
        self.gradient_checkpointing = gradient_checkpointing
        # block whose output forward() keeps for an auxiliary head (WhisperCTC's phone head); 0: none
        self.tap_layer, self.tapped = 0, None
        self.output_dim = d_model

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return (torch.div(lengths - 1, 2, rounding_mode="floor") + 1).clamp_min(0)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lens = self.output_lengths(lengths)
        if (feats.size(1) + 1) // 2 > self.max_positions:
            raise ValueError(f"input of {feats.size(1)} frames is longer than the encoder's "
                             f"{2 * self.max_positions} ({self.max_positions} positions, 30 s for Whisper); split it")
        if feats.size(1) == 0:  # no frames at all: one padded frame keeps the convolutions defined
            feats = F.pad(feats, (0, 0, 0, 1))
        x = feats.transpose(1, 2)  # (B, n_mels, T)
        if self.mask_padding:
            in_mask = lengths_to_mask(lengths, x.size(-1))[:, None, :].to(x.dtype)
            x = F.gelu(self.conv1(x * in_mask)) * in_mask
        else:
            x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T2, d)
        x = self.dropout(x + self.embed_positions[: x.size(1)].to(x.dtype))
        attn_mask = None
        if self.mask_padding:  # (B, 1, 1, T2), True = attend; an empty utterance keeps frame 0 (no NaN rows)
            attn_mask = lengths_to_mask(out_lens.clamp_min(1), x.size(1))[:, None, None, :]
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        self.tapped = None
        for i, layer in enumerate(self.layers, 1):
            if use_ckpt and any(p.requires_grad for p in layer.parameters()):
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
            if i == self.tap_layer and i < len(self.layers):  # an auxiliary head reads this block's output
                self.tapped = x
        return self.layer_norm(x), out_lens


class WhisperCTC(nn.Module):
    """WhisperEncoder -> [BiLSTM] -> dropout -> Linear -> log_softmax (fp32). See the module docstring."""

    feature_kind = "logmel"  # the trainer may SpecAugment ``wave_frontend``'s output

    def __init__(self, cfg: dict[str, Any], vocab_size: int):
        super().__init__()
        from asrflow.train.models import BiLSTMEncoder

        self.model_config = dict(cfg)
        self.vocab_size = vocab_size
        self.cmvn = None
        self.wave_frontend = WhisperLogMel(cfg["n_mels"])
        self.encoder = WhisperEncoder(cfg["n_mels"], cfg["d_model"], cfg["num_layers"], cfg["num_heads"],
                                      cfg["ffn_dim"], cfg["max_positions"], cfg["encoder_dropout"],
                                      cfg["attention_dropout"], cfg["mask_padding"], cfg["gradient_checkpointing"])
        dim = self.encoder.output_dim
        self.phone_ctc_layer = int(cfg.get("phone_ctc_layer") or 0)
        self.phone_head = nn.Linear(dim, int(cfg["phone_vocab_size"])) if self.phone_ctc_layer else None
        self.phone_log_probs: torch.Tensor | None = None
        self.encoder.tap_layer = self.phone_ctc_layer
        self.head_lstm = None
        if cfg["head_lstm_layers"]:
            self.head_lstm = BiLSTMEncoder(dim, cfg["head_lstm_hidden"], cfg["head_lstm_layers"], cfg["dropout"])
            dim = self.head_lstm.output_dim
        self.dropout = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(dim, vocab_size)
        # the training-only auxiliary decoder (``decoder: frozen | trained``; attach_decoder) and the encoder output of
        # the last forward pass, which its loss reads (as a conformer keeps its intermediate log-probs)
        self.decoder: nn.Module | None = None
        self.text_tokens = None
        self.last_encoded: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach_decoder(self, decoder: nn.Module, text_tokens) -> None:
        self.decoder, self.text_tokens = decoder, text_tokens

    def decoder_loss(self, texts: list[str]) -> torch.Tensor:
        """The auxiliary decoder's cross-entropy on the last forward pass's encoder output (loss.decoder_weight)."""
        from asrflow.train.pretrained.whisper_decoder import decoder_loss

        if self.decoder is None or self.last_encoded is None:
            raise RuntimeError("decoder_loss needs a model built with a decoder (frozen or trained), after a forward pass")
        return decoder_loss(self.decoder, self.text_tokens, texts, *self.last_encoded)

    subsampling_factor = 2  # output frames per front-end frame (20 ms each)

    def output_lengths(self, feat_lens: torch.Tensor) -> torch.Tensor:
        return self.encoder.output_lengths(feat_lens)

    def pretrained_modules(self) -> list[nn.Module]:
        """What the checkpoint provides (gets ``pretrained_lr_scale``); empty for a random init."""
        if not self.model_config.get("checkpoint"):
            return []
        trained_decoder = self.decoder is not None and self.model_config.get("decoder") == "trained"
        return [self.encoder] + ([self.decoder] if trained_decoder else [])

    def freeze_units(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(the convolutional stem, the blocks in order); ``freeze: k`` freezes the stem and blocks[:k]."""
        return [self.encoder.conv1, self.encoder.conv2], list(self.encoder.layers)

    def always_frozen_modules(self) -> list[nn.Module]:
        return [self.decoder] if self.decoder is not None and self.model_config.get("decoder") == "frozen" else []

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor,
                normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats``: ``wave_frontend``'s output (optionally SpecAugmented); ``normalized`` is ignored (no CMVN)."""
        return self.forward_encoded(*self.encode(feats, feat_lens))

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretrained part alone: (hidden (B, T', d_model), out_lens). With ``freeze: all`` its output
        can be cached once and the head trained on it with :meth:`forward_encoded`."""
        return self.encoder(feats, feat_lens)

    def forward_encoded(self, hidden: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable head on (possibly cached) ``encode`` output -> (log_probs fp32, out_lens)."""
        x = hidden
        self.last_encoded = (hidden, lens) if self.decoder is not None else None
        if self.phone_head is not None:
            below_top = self.phone_ctc_layer < len(self.encoder.layers)
            tapped = self.encoder.tapped if below_top else hidden
            self.encoder.tapped = None  # read once: a later cached batch must not see this one's
            if tapped is None or tapped.shape[:2] != hidden.shape[:2]:
                raise RuntimeError(f"phone_ctc_layer {self.phone_ctc_layer} reads block {self.phone_ctc_layer}'s "
                                   "output, which only encode() on this same batch provides")
            self.phone_log_probs = self.phone_head(tapped).float().log_softmax(-1)
        if self.head_lstm is not None:
            x, lens = self.head_lstm(x, lens)
        logits = self.head(self.dropout(x))
        return logits.float().log_softmax(-1), lens


# ------------------------------------------------------------------------------------------------ loading

def detect_format(path: Path) -> str:
    """"huggingface" or "ctranslate2" for a local folder (or a weights file inside one)."""
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        if path.name == "model.bin":
            return "ctranslate2"
        if path.suffix in (".safetensors", ".bin"):
            return "huggingface"
    hf_weights = any((folder / n).exists() for n in ("model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin"))
    if hf_weights:
        return "huggingface"
    if (folder / "model.bin").exists():
        return "ctranslate2"
    raise CheckpointError(f"{path}: neither a Hugging Face Whisper folder (config.json + model.safetensors or "
                          "pytorch_model.bin) nor a CTranslate2 Whisper folder (model.bin)")


def _hf_arch(path: Path) -> dict[str, Any]:
    folder = path if path.is_dir() else path.parent
    cfg = read_json(folder / "config.json", "a Hugging Face Whisper config.json")
    if cfg.get("model_type") != "whisper":
        raise CheckpointError(f"{folder / 'config.json'}: model_type is {cfg.get('model_type')!r}; expected 'whisper'")
    act = cfg.get("activation_function", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{folder / 'config.json'}: activation_function {act!r}; this encoder implements 'gelu'")
    return {"n_mels": cfg.get("num_mel_bins", 80), "d_model": cfg["d_model"], "num_layers": cfg["encoder_layers"],
            "num_heads": cfg["encoder_attention_heads"], "ffn_dim": cfg["encoder_ffn_dim"],
            "max_positions": cfg.get("max_source_positions", 1500)}


def _hf_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    state = read_hf_state_dict(path)
    for prefix in ("model.encoder.", "encoder.", ""):
        if prefix + "conv1.weight" in state:
            break
    else:
        raise CheckpointError(f"{path}: no Whisper encoder weights (looked for model.encoder.conv1.weight, "
                              "encoder.conv1.weight, conv1.weight)")
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix == "":
        out = {k: v for k, v in out.items() if not k.startswith(("decoder.", "model.", "proj_out"))}
    if "embed_positions.weight" in out:
        out["embed_positions"] = out.pop("embed_positions.weight")
    out = {k: v for k, v in out.items() if not re.fullmatch(r"layers\.\d+\.self_attn\.k_proj\.bias", k)}
    return out


_CT2_LAYER_NAMES = {
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}
_CT2_TOP_NAMES = {
    "encoder/conv1/weight": "conv1.weight", "encoder/conv1/bias": "conv1.bias",
    "encoder/conv2/weight": "conv2.weight", "encoder/conv2/bias": "conv2.bias",
    "encoder/position_encodings/encodings": "embed_positions",
    "encoder/layer_norm/gamma": "layer_norm.weight", "encoder/layer_norm/beta": "layer_norm.bias",
}


# CTranslate2 fuses some projections into one tensor: each fused name -> our names of its equal parts in order
# (None: a part we drop, the key bias that Whisper has as 0 and that cancels in the softmax)
_CT2_FUSED_SELF_ATTENTION = {
    "self_attention/linear_0/weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "self_attention/linear_0/bias": ["self_attn.q_proj.bias", None, "self_attn.v_proj.bias"],
}


def rename_ct2_variables(where: Path, variables: dict[str, torch.Tensor], component: str, top_names: dict[str, str],
                         layer_names: dict[str, str], fused: dict[str, list[str | None]]
                         ) -> tuple[dict[str, torch.Tensor], set[int], list[str]]:
    """CTranslate2 ``<component>/...`` variables -> (our state dict, the layer numbers seen, unknown names).
    Scalars (CTranslate2's options) are left to the caller; fused tensors are split into equal parts."""
    layer_re = re.compile(rf"{component}/layer_(\d+)/(.+)")
    out: dict[str, torch.Tensor] = {}
    layers: set[int] = set()
    unknown: list[str] = []
    for name, value in variables.items():
        if value.dim() == 0:
            continue
        value = value.float() if value.is_floating_point() else value
        if name in top_names:
            out[top_names[name]] = value
            continue
        m = layer_re.fullmatch(name)
        if not m:
            unknown.append(name)
            continue
        i, rest = int(m.group(1)), m.group(2)
        layers.add(i)
        if rest in layer_names:
            out[f"layers.{i}.{layer_names[rest]}"] = value
        elif rest in fused:
            parts = fused[rest]
            if value.shape[0] % len(parts):
                raise CheckpointError(f"{where}: {name} has shape {list(value.shape)}; expected {len(parts)} fused "
                                      "projections of equal size")
            for ours, t in zip(parts, value.chunk(len(parts), dim=0)):
                if ours is not None:
                    out[f"layers.{i}.{ours}"] = t.contiguous()
        else:
            unknown.append(name)
    if layers != set(range(len(layers))):
        raise CheckpointError(f"{where}: {component} layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    return out, layers, unknown


def _ct2_encoder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, encoder state dict in WhisperEncoder's names) from a CTranslate2 Whisper model.bin."""
    model = read_ct2_model_bin(path, keep=lambda n: n.startswith("encoder/"))
    where = model["path"]
    if model["spec"] != "WhisperSpec":
        raise CheckpointError(f"{where}: a CTranslate2 {model['spec']} model; expected a WhisperSpec model")
    vs = model["variables"]
    quantized = sorted(n for n in vs if n.endswith("weight_scale"))
    if quantized:
        raise CheckpointError(f"{where}: quantized weights ({quantized[0]} ...); expected float32/float16/bfloat16 "
                              "(convert with --quantization float16)")
    if "encoder/conv1/weight" not in vs or "encoder/num_heads" not in vs:
        raise CheckpointError(f"{where}: no Whisper encoder (expected encoder/conv1/weight and encoder/num_heads)")
    out, layers, unknown = rename_ct2_variables(where, vs, "encoder", _CT2_TOP_NAMES, _CT2_LAYER_NAMES,
                                                _CT2_FUSED_SELF_ATTENTION)
    unknown += sorted(n for n, v in vs.items() if v.dim() == 0 and n != "encoder/num_heads")
    if unknown:
        raise CheckpointError(f"{where}: unexpected encoder variable(s) {sorted(unknown)[:6]}; expected a plain "
                              "Whisper encoder (ctranslate2's WhisperEncoderSpec)")
    w = out["conv1.weight"]
    arch = {"n_mels": int(w.shape[1]), "d_model": int(w.shape[0]), "num_layers": len(layers),
            "num_heads": int(vs["encoder/num_heads"]),
            "ffn_dim": int(out["layers.0.fc1.weight"].shape[0]) if layers else 4 * int(w.shape[0]),
            "max_positions": int(out["embed_positions"].shape[0]) if "embed_positions" in out else 1500}
    if "embed_positions" not in out:  # CTranslate2 may leave sinusoidal tables implicit
        out["embed_positions"] = sinusoids(arch["max_positions"], arch["d_model"])
    return arch, out


def encoder_to_ct2_variables(encoder: WhisperEncoder, num_heads: int) -> dict[str, Any]:
    """The inverse of the CTranslate2 reader: ``encoder/*`` variables (float32, fused q/k/v with a zero key
    bias) for :func:`~asrflow.train.pretrained.checkpoints.write_ct2_model_bin` (tests write tiny models)."""
    sd = {k: v.detach().float() for k, v in encoder.state_dict().items()}
    out: dict[str, Any] = {ct2: sd[ours] for ct2, ours in _CT2_TOP_NAMES.items()}
    out["encoder/num_heads"] = int(num_heads)
    for i in range(len(encoder.layers)):
        pre = f"layers.{i}."
        for ct2, ours in _CT2_LAYER_NAMES.items():
            out[f"encoder/layer_{i}/{ct2}"] = sd[pre + ours]
        out[f"encoder/layer_{i}/self_attention/linear_0/weight"] = torch.cat(
            [sd[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"encoder/layer_{i}/self_attention/linear_0/bias"] = torch.cat(
            [sd[pre + "self_attn.q_proj.bias"], torch.zeros_like(sd[pre + "self_attn.q_proj.bias"]),
             sd[pre + "self_attn.v_proj.bias"]])
    return out


def load_whisper_encoder_state(path: str | Path, fmt: str = "auto") -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(architecture, float32 state dict for :class:`WhisperEncoder`, resolved format) from a local checkpoint."""
    p = require_path(path, "a Hugging Face or CTranslate2 Whisper folder")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt == "huggingface":
        return _hf_arch(p), {k: (v.float() if v.is_floating_point() else v) for k, v in _hf_encoder_state(p).items()}, fmt
    if fmt == "ctranslate2":
        arch, state = _ct2_encoder(p)
        return arch, state, fmt
    raise ValueError(f"checkpoint_format must be auto, huggingface or ctranslate2, got {fmt!r}")


def read_whisper_arch(path: str | Path, fmt: str = "auto") -> dict[str, Any]:
    p = require_path(path, "a Hugging Face or CTranslate2 Whisper folder")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt == "huggingface":
        return _hf_arch(p)
    return load_whisper_encoder_state(p, fmt)[0]


def resolve_whisper_config(cfg: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(cfg) - set(WHISPER_DEFAULTS) - {"name"})
    if unknown:
        raise ValueError(f"unknown whisper_encoder model option(s) {unknown}; known: {sorted(WHISPER_DEFAULTS)}")
    c = {"name": "whisper_encoder", **WHISPER_DEFAULTS, **{k: v for k, v in cfg.items() if k != "name"}}
    if c["checkpoint_format"] not in ("auto", "huggingface", "ctranslate2"):
        raise ValueError(f"checkpoint_format must be auto, huggingface or ctranslate2, got {c['checkpoint_format']!r}")
    if any(c[k] is None for k in ARCH_KEYS):
        arch = read_whisper_arch(c["checkpoint"], c["checkpoint_format"]) if c["checkpoint"] else RANDOM_INIT_ARCH
        for k in ARCH_KEYS:
            if c[k] is None:
                c[k] = int(arch[k])
    if c["checkpoint"]:
        c["checkpoint"] = str(c["checkpoint"])
    from asrflow.train.pretrained.whisper_decoder import decoder_mode

    c["decoder"] = decoder_mode(c)
    layer = int(c.get("phone_ctc_layer") or 0)
    if layer and not 0 < layer <= c["num_layers"]:
        raise ValueError(f"whisper_encoder: phone_ctc_layer must be between 1 and num_layers = {c['num_layers']} "
                         f"(the encoder's output), got {layer}")
    if layer and int(c.get("phone_vocab_size") or 0) < 2:
        raise ValueError("whisper_encoder: phone_ctc_layer needs phone_vocab_size (the trainer sets it from the "
                         "phone lexicon)")
    return c


def build_whisper_model(c: dict[str, Any], vocab_size: int, load_weights: bool = True) -> WhisperCTC:
    """A resolved config -> WhisperCTC; with ``load_weights`` and a checkpoint, the encoder is loaded from it."""
    model = WhisperCTC(c, vocab_size)
    if load_weights and c.get("checkpoint"):
        arch, state, fmt = load_whisper_encoder_state(c["checkpoint"], c["checkpoint_format"])
        where = require_path(c["checkpoint"], "a Hugging Face or CTranslate2 Whisper folder")
        for k in ARCH_KEYS:
            if int(arch[k]) != int(c[k]):
                raise CheckpointError(f"{where}: the checkpoint has {k}={arch[k]}, the model config says {c[k]}")
        expected = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
        check_shapes(where, expected, state, "a Whisper encoder of " + ", ".join(f"{k}={c[k]}" for k in ARCH_KEYS))
        extra = sorted(set(state) - set(expected))
        if extra:
            raise CheckpointError(f"{where}: unexpected encoder tensor(s) {extra[:6]}")
        model.encoder.load_state_dict(state)
        model.model_config["checkpoint_format"] = fmt
        log.info("whisper_encoder: loaded %d encoder tensors from %s (%s)", len(state), where, fmt)
    if c["decoder"] != "none":  # its architecture comes from the checkpoint, so it is read even for a resume
        from asrflow.train.pretrained.whisper_decoder import load_whisper_decoder

        if not c.get("checkpoint"):
            raise ValueError(f"whisper_encoder: decoder: {c['decoder']} needs a checkpoint (Whisper's pretrained decoder)")
        model.attach_decoder(*load_whisper_decoder(c["checkpoint"], c["checkpoint_format"], int(c["d_model"])))
    return model
