"""CTC acoustic models: convolutional subsampling, an encoder (Conformer or BiLSTM), a linear CTC head.

``AcousticModel(feats (B, T, n_mels), feat_lens (B,)) -> (log_probs (B, T', V) float32, out_lens (B,))``.
Output lengths are computed exactly from input lengths, and real output frames never depend on how
much the batch is padded (in eval mode): the subsampling convolutions are unpadded, the LSTM runs on
packed sequences, and the Conformer's depthwise convolution sees zeros past each utterance's end.

Build one from a config dict with ``build_model(cfg, vocab_size, n_mels)``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
import torchaudio
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from asrflow.train.features import GlobalCMVN, lengths_to_mask

# (kernel, stride) of each Conv2d, applied identically to time and frequency.
# x2 and x3 are for fast speech with character units: English runs ~15 characters/s (the default corpus:
# 14.6 mean, 18.2 at the 90th percentile), which at x4 (25 frames/s) fills 60-75% of the frames with
# labels (Deep Speech 2 found strides above 2 hurt English characters). On 2 CPU cores x2 made steps
# 1.8x slower and lost to x4 in a 5-minute budget (README), so x4 stays the default.
SUBSAMPLING_LAYERS: dict[int, list[tuple[int, int]]] = {
    2: [(3, 1), (3, 2)],
    3: [(3, 1), (5, 3)],
    4: [(3, 2), (3, 2)],
    6: [(3, 2), (5, 3)],
    8: [(3, 2), (3, 2), (3, 2)],
}


def conv_out_length(lengths: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Output length of an unpadded convolution; clamped at 0 for inputs shorter than the kernel."""
    return (torch.div(lengths - kernel, stride, rounding_mode="floor") + 1).clamp_min(0)


class ConvSubsampling(nn.Module):
    """Conv2d stack (ReLU after each) over (time, mel) reducing time by ``factor``, then Linear -> ``out_dim``.

    Convolutions are unpadded, so output frame ``i < out_len`` only sees real input frames.
    """

    def __init__(self, in_feats: int, out_dim: int, channels: int | None = None, factor: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if factor not in SUBSAMPLING_LAYERS:
            raise ValueError(f"subsampling factor must be one of {sorted(SUBSAMPLING_LAYERS)}, got {factor}")
        self.factor = factor
        self.specs = SUBSAMPLING_LAYERS[factor]
        channels = int(channels or out_dim)
        layers: list[nn.Module] = []
        freq, in_ch = in_feats, 1
        for kernel, stride in self.specs:
            layers += [nn.Conv2d(in_ch, channels, kernel, stride), nn.ReLU()]
            freq, in_ch = (freq - kernel) // stride + 1, channels
        if freq < 1:
            raise ValueError(f"{in_feats} feature bins are too few for subsampling x{factor}")
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(channels * freq, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.min_input_frames = self._min_input_frames()

    def _min_input_frames(self) -> int:
        n = 1
        for kernel, stride in reversed(self.specs):
            n = (n - 1) * stride + kernel
        return n

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for kernel, stride in self.specs:
            lengths = conv_out_length(lengths, kernel, stride)
        return lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.size(1) < self.min_input_frames:  # too short for one output frame: pad (length stays 0)
            feats = nn.functional.pad(feats, (0, 0, 0, self.min_input_frames - feats.size(1)))
        x = self.conv(feats.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return self.dropout(x), self.output_lengths(lengths)


@contextlib.contextmanager
def _restore_batchnorm_stats(module: nn.Module):
    """Undo running-stat updates made inside the block.

    Activation checkpointing runs a layer's forward twice (once more in backward); without this,
    BatchNorm running statistics would take two momentum steps per training step.
    """
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, n) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def checkpointed(fn: Callable, module: nn.Module, *args: Any) -> Any:
    """``fn(*args)`` under non-reentrant activation checkpointing; BatchNorm stats updated once."""
    def contexts():
        return contextlib.nullcontext(), _restore_batchnorm_stats(module)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def reverse_within_lengths(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, frames) gather index that reverses each row's first ``lengths[b]`` frames and keeps the padding
    after them in place; it is its own inverse."""
    t = torch.arange(frames, device=lengths.device)[None, :]
    n = lengths.to(t.device)[:, None]
    return torch.where(t < n, n - 1 - t, t)


class BiLSTMEncoder(nn.Module):
    """Stacked bidirectional LSTMs on padded batches; output dim ``2 * hidden_size``, zero past each length.

    One ``nn.LSTM`` per layer (rather than ``num_layers=``) so each layer can be checkpointed alone and
    dropout sits between layers. Each direction runs as one call on the padded batch (the backward one on
    every utterance reversed within its own length), so padding only ever follows an utterance's real
    frames and never reaches them. Not a ``PackedSequence``: on a CPU, PyTorch's LSTM backward over a
    packed batch is unrolled step by step with a zero-filled gradient of the whole input per step, which is
    quadratic in the length (a Whisper tiny.en fine-tuning step on one 15 s utterance: 1.05 s packed, 0.69 s
    padded; ``docs/results.md``, "Session 9").
    """

    def __init__(self, input_dim: int, hidden_size: int = 256, num_layers: int = 3, dropout: float = 0.1,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.LSTM(input_dim if i == 0 else 2 * hidden_size, hidden_size, batch_first=True, bidirectional=True)
            for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * hidden_size
        self.gradient_checkpointing = gradient_checkpointing

    @staticmethod
    def _direction(lstm: nn.LSTM, x: torch.Tensor, suffix: str) -> torch.Tensor:
        """One direction of ``lstm`` (weights ``*_l0`` + ``suffix``) over the whole padded batch."""
        weights = [getattr(lstm, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h0 = x.new_zeros(1, x.size(0), lstm.hidden_size)
        out, _, _ = torch.lstm(x, (h0, h0), weights, True, 1, 0.0, lstm.training, False, True)
        return out

    @staticmethod
    def _run_layer(lstm: nn.LSTM, x: torch.Tensor, lengths_cpu: torch.Tensor) -> torch.Tensor:
        rev = reverse_within_lengths(lengths_cpu, x.size(1)).to(x.device)[:, :, None].expand(-1, -1, x.size(2))
        forward = BiLSTMEncoder._direction(lstm, x, "")
        backward = BiLSTMEncoder._direction(lstm, x.gather(1, rev), "_reverse")
        backward = backward.gather(1, rev[:, :, :1].expand(-1, -1, backward.size(2)))
        out = torch.cat([forward, backward], dim=-1)
        # zero past each length, as a packed batch gives: the next layer's input and the head see only real frames
        return out * lengths_to_mask(lengths_cpu.to(x.device), x.size(1))[:, :, None].to(out.dtype)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, lstm in enumerate(self.layers):
            if i > 0:
                x = self.dropout(x)
            if use_ckpt:
                x = checkpointed(self._run_layer, lstm, lstm, x, lengths_cpu)
            else:
                x = self._run_layer(lstm, x, lengths_cpu)
        return self.dropout(x), lengths


def _padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True on padded positions (what nn.MultiheadAttention's key_padding_mask wants).

    An utterance with no frames keeps position 0 unmasked: a fully masked attention row is NaN, and in
    training mode BatchNorm would spread that NaN to the whole batch.
    """
    return ~lengths_to_mask(lengths.clamp_min(1), max_len)


class ConformerEncoder(nn.Module):
    """``torchaudio.models.Conformer`` whose layers are driven here, to add two things.

    * per-layer activation checkpointing (``gradient_checkpointing=True``);
    * ``mask_conv_padding`` (default on): padded frames are zeroed right before each depthwise
      convolution, so the last ``kernel // 2`` real frames see the same zeros as at a true sequence
      end instead of padding activations. torchaudio's own forward does not do this, which makes
      outputs depend on the batch's padding. The layer forward below mirrors
      ``torchaudio.models.conformer.ConformerLayer.forward`` (torchaudio 2.x) step by step.

    There is no positional encoding, as in torchaudio: the convolution modules carry position.
    The conv modules' BatchNorm1d layers are ordinary submodules (``model.modules()`` finds them).
    Note that in training mode their batch statistics include padded frames.
    """

    def __init__(self, input_dim: int, num_heads: int = 4, ffn_dim: int = 576, num_layers: int = 6,
                 depthwise_conv_kernel_size: int = 15, dropout: float = 0.1, use_group_norm: bool = False,
                 convolution_first: bool = False, gradient_checkpointing: bool = False,
                 mask_conv_padding: bool = True):
        super().__init__()
        self.conformer = torchaudio.models.Conformer(
            input_dim=input_dim, num_heads=num_heads, ffn_dim=ffn_dim, num_layers=num_layers,
            depthwise_conv_kernel_size=depthwise_conv_kernel_size, dropout=dropout,
            use_group_norm=use_group_norm, convolution_first=convolution_first,
        )
        self.output_dim = input_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.mask_conv_padding = mask_conv_padding
        if mask_conv_padding:
            for layer in self.conformer.conformer_layers:
                _check_conv_module_layout(layer)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor,
                after_layer: "Callable[[int, torch.Tensor], torch.Tensor] | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``after_layer(i, h)`` (h batch-first) may read and replace layer i's output (1-based): the
        intermediate-CTC head reads it, self-conditioning adds its predictions back."""
        pad_mask = _padding_mask(lengths, x.size(1))  # (B, T), True = padding
        layer_fn = self._masked_layer_forward if self.mask_conv_padding else self._plain_layer_forward
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = x.transpose(0, 1)  # torchaudio's layers are time-major (T, B, D)
        for i, layer in enumerate(self.conformer.conformer_layers, 1):
            if use_ckpt:
                h = checkpointed(functools.partial(layer_fn, layer), layer, h, pad_mask)
            else:
                h = layer_fn(layer, h, pad_mask)
            if after_layer is not None:
                h = after_layer(i, h.transpose(0, 1)).transpose(0, 1)
        return h.transpose(0, 1), lengths

    @staticmethod
    def _plain_layer_forward(layer: nn.Module, h: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        return layer(h, pad_mask)

    @staticmethod
    def _masked_layer_forward(layer: nn.Module, h: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        residual = h
        h = layer.ffn1(h) * 0.5 + residual
        if layer.convolution_first:
            h = h + _masked_conv_module(layer.conv_module, h, pad_mask)
        residual = h
        h = layer.self_attn_layer_norm(h)
        h, _ = layer.self_attn(query=h, key=h, value=h, key_padding_mask=pad_mask, need_weights=False)
        h = layer.self_attn_dropout(h) + residual
        if not layer.convolution_first:
            h = h + _masked_conv_module(layer.conv_module, h, pad_mask)
        residual = h
        h = layer.ffn2(h) * 0.5 + residual
        return layer.final_layer_norm(h)


def _check_conv_module_layout(layer: nn.Module) -> None:
    seq = layer.conv_module.sequential
    ok = (len(seq) == 7 and isinstance(seq[0], nn.Conv1d) and isinstance(seq[1], nn.GLU)
          and isinstance(seq[2], nn.Conv1d) and seq[2].groups == seq[2].in_channels)
    if not ok:
        raise RuntimeError("torchaudio's Conformer convolution module changed layout; "
                           "use mask_conv_padding=False with this torchaudio version")


def _masked_conv_module(conv_module: nn.Module, h: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """torchaudio ``_ConvolutionModule.forward`` with padding zeroed before the depthwise conv.

    h: (T, B, D) -> (T, B, D) (residual not included).
    """
    seq = conv_module.sequential
    y = conv_module.layer_norm(h).permute(1, 2, 0)  # (B, D, T)
    y = seq[1](seq[0](y))  # pointwise conv + GLU
    y = y.masked_fill(pad_mask[:, None, :], 0.0)
    for m in seq[2:]:  # depthwise conv, norm, SiLU, pointwise conv, dropout
        y = m(y)
    return y.permute(2, 0, 1)


class AcousticModel(nn.Module):
    """[optional GlobalCMVN] -> ConvSubsampling -> encoder -> dropout -> Linear -> log_softmax (fp32).

    The log-softmax is taken in fp32 even under autocast: CTC sums over many alignments and fp16/bf16
    log-probs are too coarse for it.
    """

    def __init__(self, frontend: ConvSubsampling, encoder: nn.Module, vocab_size: int, dropout: float = 0.1,
                 cmvn: GlobalCMVN | None = None, inter_ctc_layer: int = 0, self_condition: bool = False,
                 phone_ctc_layer: int = 0, phone_vocab_size: int = 0):
        super().__init__()
        self.cmvn = cmvn
        self.frontend = frontend
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.output_dim, vocab_size)
        self.vocab_size = vocab_size
        # Intermediate CTC (Lee & Watanabe 2021): a CTC head on layer `inter_ctc_layer`'s output, trained
        # alongside the final one (see compute_loss); self-conditioning (Nozaki & Komatsu 2021) adds a
        # projection of its predictions back into the encoder. Inference uses the final head only.
        self.inter_ctc_layer = int(inter_ctc_layer)
        self.inter_head = nn.Linear(encoder.output_dim, vocab_size) if self.inter_ctc_layer else None
        self.condition = nn.Linear(vocab_size, encoder.output_dim) if self.inter_ctc_layer and self_condition else None
        self.intermediate_log_probs: torch.Tensor | None = None  # of the last forward pass, for the loss
        # Auxiliary phone CTC (asrflow.phones): a head predicting espeak-ng phones on layer
        # `phone_ctc_layer`, a target that follows the sound where characters follow spelling.
        self.phone_ctc_layer = int(phone_ctc_layer)
        self.phone_head = nn.Linear(encoder.output_dim, phone_vocab_size) if self.phone_ctc_layer else None
        self.phone_log_probs: torch.Tensor | None = None

    @property
    def subsampling_factor(self) -> int:
        return self.frontend.factor

    def output_lengths(self, feat_lens: torch.Tensor) -> torch.Tensor:
        return self.frontend.output_lengths(feat_lens)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor,
                normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``normalized=True``: feats already went through ``self.cmvn`` (e.g. to SpecAugment after CMVN)."""
        if self.cmvn is not None and not normalized:
            feats = self.cmvn(feats, feat_lens)
        x, lens = self.frontend(feats, feat_lens)
        self.intermediate_log_probs = self.phone_log_probs = None
        if self.inter_head is None and self.phone_head is None:
            x, lens = self.encoder(x, lens)
        else:
            x, lens = self.encoder(x, lens, after_layer=self._intermediate)
        logits = self.head(self.dropout(x))
        return logits.float().log_softmax(-1), lens

    def _intermediate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer == self.phone_ctc_layer:
            self.phone_log_probs = self.phone_head(h).float().log_softmax(-1)
        if layer != self.inter_ctc_layer:
            return h
        log_probs = self.inter_head(h).float().log_softmax(-1)
        self.intermediate_log_probs = log_probs
        if self.condition is not None:
            h = h + self.condition(log_probs.exp().to(h.dtype))
        return h


CONFORMER_DEFAULTS: dict[str, Any] = {
    "d_model": 144, "num_heads": 4, "ffn_dim": 576, "num_layers": 6, "kernel_size": 15, "dropout": 0.1,
    "subsampling": 4, "subsampling_channels": 64, "use_group_norm": False, "convolution_first": False,
    "mask_conv_padding": True, "gradient_checkpointing": False,
    "inter_ctc_layer": 0, "self_condition": False,  # intermediate CTC head on this layer (0: off)
    "phone_ctc_layer": 0, "phone_vocab_size": 0,    # auxiliary phone CTC head on this layer (0: off)
}
BILSTM_DEFAULTS: dict[str, Any] = {
    "d_model": 192, "hidden_size": 192, "num_layers": 3, "dropout": 0.1,
    "subsampling": 4, "subsampling_channels": 64, "gradient_checkpointing": False,
}
# Defaults are sized for CPU-only training on a couple of cores (~3M parameters each); the
# subsampling convolutions use 64 channels because at T/2 resolution they cost as much as the encoder.
MODEL_DEFAULTS = {"conformer": CONFORMER_DEFAULTS, "bilstm": BILSTM_DEFAULTS}


# Pretrained-encoder models (asrflow.train.pretrained), built and resolved there.
PRETRAINED_MODEL_NAMES = ("whisper_encoder", "wav2vec2")


def resolve_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; unknown keys are an error (a typo would otherwise silently fall back)."""
    name = cfg.get("name")
    if name in PRETRAINED_MODEL_NAMES:
        from asrflow.train.pretrained import resolve_pretrained_config

        return resolve_pretrained_config(cfg)
    if name not in MODEL_DEFAULTS:
        raise ValueError(f"model name must be one of {sorted(MODEL_DEFAULTS) + list(PRETRAINED_MODEL_NAMES)}, "
                         f"got {name!r}")
    defaults = MODEL_DEFAULTS[name]
    unknown = sorted(set(cfg) - set(defaults) - {"name"})
    if unknown:
        raise ValueError(f"unknown {name} model option(s) {unknown}; known: {sorted(defaults)}")
    return {"name": name, **defaults, **{k: v for k, v in cfg.items() if k != "name"}}


def build_model(cfg: dict[str, Any], vocab_size: int, n_mels: int, cmvn: GlobalCMVN | None = None,
                load_weights: bool = True) -> nn.Module:
    """Model from ``cfg`` (``name``: "conformer" | "bilstm", plus options of ``MODEL_DEFAULTS[name]``).

    ``whisper_encoder`` and ``wav2vec2`` (:mod:`asrflow.train.pretrained`) bring their own front end
    (``model.wave_frontend``) and normalization: ``n_mels`` and ``cmvn`` do not apply to them, and their
    checkpoint is read unless ``load_weights=False`` (rebuilding an exported model).
    """
    if cfg.get("name") in PRETRAINED_MODEL_NAMES:
        from asrflow.train.pretrained import build_pretrained_model

        return build_pretrained_model(cfg, vocab_size, load_weights=load_weights)
    c = resolve_model_config(cfg)
    frontend = ConvSubsampling(n_mels, c["d_model"], channels=c["subsampling_channels"], factor=c["subsampling"],
                               dropout=c["dropout"])
    if c["name"] == "conformer":
        encoder: nn.Module = ConformerEncoder(
            c["d_model"], num_heads=c["num_heads"], ffn_dim=c["ffn_dim"], num_layers=c["num_layers"],
            depthwise_conv_kernel_size=c["kernel_size"], dropout=c["dropout"],
            use_group_norm=c["use_group_norm"], convolution_first=c["convolution_first"],
            gradient_checkpointing=c["gradient_checkpointing"], mask_conv_padding=c["mask_conv_padding"],
        )
    else:
        encoder = BiLSTMEncoder(c["d_model"], hidden_size=c["hidden_size"], num_layers=c["num_layers"],
                                dropout=c["dropout"], gradient_checkpointing=c["gradient_checkpointing"])
    inter = int(c.get("inter_ctc_layer", 0))
    if inter and not 0 < inter < c["num_layers"]:
        raise ValueError(f"inter_ctc_layer must be between 1 and num_layers - 1 = {c['num_layers'] - 1}, got {inter}")
    phone_layer, phone_vocab = int(c.get("phone_ctc_layer", 0)), int(c.get("phone_vocab_size", 0))
    if phone_layer and not 0 < phone_layer < c["num_layers"]:
        raise ValueError(f"phone_ctc_layer must be between 1 and num_layers - 1 = {c['num_layers'] - 1}, "
                         f"got {phone_layer}")
    if phone_layer and phone_vocab < 2:
        raise ValueError("phone_ctc_layer needs phone_vocab_size (the trainer sets it from the phone lexicon)")
    return AcousticModel(frontend, encoder, vocab_size, dropout=c["dropout"], cmvn=cmvn, inter_ctc_layer=inter,
                         self_condition=bool(c.get("self_condition", False)), phone_ctc_layer=phone_layer,
                         phone_vocab_size=phone_vocab)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers with running statistics (for averaging them across ranks before saving/eval)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
