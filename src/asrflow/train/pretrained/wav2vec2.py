"""wav2vec 2.0 / HuBERT with a CTC head (``model.name: wav2vec2``), built from ``torchaudio.models`` components.

* Input is the raw waveform. :class:`WaveformFrontend` (the model's ``wave_frontend``) maps
  ``(waves (B, S) float 16 kHz, wave_lens) -> (feats (B, S, 1), wave_lens)``: samples past each length
  zeroed, and, with ``normalize_waveform``, each utterance scaled to zero mean and unit variance over its
  real samples (what Hugging Face's ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does). The trailing
  axis only makes the tensor look like (B, T, D) features; ``forward`` also accepts (B, S).
  Do not SpecAugment these "features" (``feature_kind == "waveform"``): the model masks internally.
* :class:`Wav2Vec2CTC`: torchaudio's ``Wav2Vec2Model`` (CNN feature encoder -> feature projection ->
  transformer), then dropout -> Linear -> log_softmax (fp32). In training, spans of the projected CNN
  features are replaced by a learned mask embedding (``mask_time_prob``, ``mask_time_length``, as in
  wav2vec 2.0 fine-tuning) and channel spans zeroed (``mask_feature_prob``). The CNN feature encoder stays
  frozen with ``freeze_feature_encoder`` (default, as in every wav2vec 2.0 fine-tuning recipe).
  One output frame per 320 samples (20 ms).
* Checkpoints, local only: a Hugging Face folder of a ``Wav2Vec2Model``/``Wav2Vec2ForCTC``/``HubertModel``
  (config.json with model_type wav2vec2 or hubert; read with transformers and converted with
  ``torchaudio.models.wav2vec2.utils.import_huggingface_model``), or a torchaudio state dict file
  (``.pt``/``.pth``: ``{"config": <wav2vec2_model kwargs>, "state_dict": ...}`` or a bare state dict,
  then with ``arch``/``arch_params`` in the model config).

Note: with ``extractor_mode: group_norm`` (wav2vec2/HuBERT base), the first CNN layer normalizes over the
whole padded waveform, so outputs depend a little on the batch's padding (as in the original models).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import nn
from torch.utils.checkpoint import checkpoint

from asrflow.train.features import lengths_to_mask
from asrflow.train.pretrained.checkpoints import CheckpointError, check_shapes, read_json, require_path

log = logging.getLogger(__name__)

# torchaudio factory functions usable as ``arch`` (with a bare torchaudio state dict, or for a random init)
ARCH_FACTORIES = ("wav2vec2_base", "wav2vec2_large", "wav2vec2_large_lv60k", "hubert_base", "hubert_large",
                  "hubert_xlarge")
# A small random-init architecture, for plumbing tests on CPU (not a pretrained model).
TINY_ARCH: dict[str, Any] = {
    "extractor_mode": "group_norm",
    "extractor_conv_layer_config": [[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]],
    "extractor_conv_bias": False, "encoder_embed_dim": 64, "encoder_projection_dropout": 0.0,
    "encoder_pos_conv_kernel": 16, "encoder_pos_conv_groups": 4, "encoder_num_layers": 2, "encoder_num_heads": 2,
    "encoder_attention_dropout": 0.0, "encoder_ff_interm_features": 128, "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.0, "encoder_layer_norm_first": False, "encoder_layer_drop": 0.0,
}
WAV2VEC2_DEFAULTS: dict[str, Any] = {
    "checkpoint": None,             # a Hugging Face folder or a torchaudio state dict file; None: random init
    "checkpoint_format": "auto",    # auto | huggingface | torchaudio
    "arch": None,                   # a torchaudio factory name (ARCH_FACTORIES) or "tiny"
    "arch_params": None,            # torchaudio.models.wav2vec2_model kwargs (filled in from the checkpoint)
    "normalize_waveform": None,     # None: the HF folder's preprocessor_config.json do_normalize, else False
    "dropout": 0.1,                 # before the head
    "freeze": "none",               # "none" | "all" | k (CNN, projection, positional conv + first k layers)
    "freeze_feature_encoder": True,  # the CNN stays frozen for the whole run, also after unfreezing
    "unfreeze_after_steps": 0,
    "unfreeze_warmup_steps": 0,     # W: after unfreezing, the encoder's LR ramps up over W steps
    "frozen_after_unfreeze": None,  # k: CNN, projection, positional conv + first k layers stay frozen after unfreezing
    "pretrained_lr_scale": 0.1,
    "pretrained_lr_decay": 1.0,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_feature_prob": 0.0,
    "mask_feature_length": 10,
    "gradient_checkpointing": False,
}
_ARCH_PARAM_KEYS = set(TINY_ARCH)


class WaveformFrontend(nn.Module):
    """(waves (B, S), lens) -> (waves zeroed past lens [and normalized per utterance], as (B, S, 1), lens)."""

    sample_rate = 16000

    def __init__(self, normalize: bool = False):
        super().__init__()
        self.normalize = bool(normalize)

    @staticmethod
    def frame_lengths(sample_lengths: torch.Tensor) -> torch.Tensor:
        return sample_lengths

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if waves.dim() != 2:
            raise ValueError(f"expected waveforms (B, S), got shape {tuple(waves.shape)}")
        lengths = lengths.to(waves.device)
        with torch.autocast(device_type=waves.device.type, enabled=False):
            real = lengths_to_mask(lengths, waves.size(1))
            x = waves.float().masked_fill(~real, 0.0)
            if self.normalize:
                n = lengths.clamp_min(1).to(x.dtype)[:, None]
                mean = x.sum(1, keepdim=True) / n
                var = ((x - mean) ** 2).masked_fill(~real, 0.0).sum(1, keepdim=True) / n
                x = ((x - mean) / torch.sqrt(var + 1e-7)).masked_fill(~real, 0.0)
        return x.unsqueeze(-1), lengths


def _span_mask(lengths: torch.Tensor, max_len: int, prob: float, span: int, generator=None) -> torch.Tensor:
    """(B, max_len) bool: about ``prob`` of each utterance's real frames covered by spans of ``span`` frames."""
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        if n <= span or prob <= 0:
            continue
        n_spans = int(prob * n / span + float(torch.rand((), generator=generator)))
        if n_spans:
            starts = torch.randint(0, n - span + 1, (n_spans,), generator=generator)
            for s in starts.tolist():
                mask[b, s: s + span] = True
    return mask


class Wav2Vec2CTC(nn.Module):
    feature_kind = "waveform"  # no SpecAugment on wave_frontend's output; the model masks internally

    def __init__(self, cfg: dict[str, Any], vocab_size: int):
        super().__init__()
        self.model_config = dict(cfg)
        self.vocab_size = vocab_size
        self.cmvn = None
        self.wave_frontend = WaveformFrontend(bool(cfg.get("normalize_waveform")))
        self.wav2vec2 = _torchaudio_model(cfg)
        dim = self.wav2vec2.encoder.feature_projection.projection.out_features
        self.conv_specs = [(int(k), int(s)) for layer in self.wav2vec2.feature_extractor.conv_layers
                           for k, s in [(layer.kernel_size, layer.stride)]]
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        self.dropout = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(dim, vocab_size)

    @property
    def subsampling_factor(self) -> int:
        f = 1
        for _, s in self.conv_specs:
            f *= s
        return f

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for k, s in self.conv_specs:
            lengths = (torch.div(lengths - k, s, rounding_mode="floor") + 1).clamp_min(0)
        return lengths

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.wav2vec2] if self.model_config.get("checkpoint") else []

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The checkpoint's parameters (the mask embedding too when the checkpoint had one)."""
        params = [p for m in self.pretrained_modules() for p in m.parameters()]
        if self.model_config.get("checkpoint") and getattr(self, "_mask_embedding_loaded", False):
            params.append(self.mask_embedding)
        return params

    def freeze_units(self) -> tuple[list[nn.Module], list[nn.Module]]:
        enc = self.wav2vec2.encoder
        return ([self.wav2vec2.feature_extractor, enc.feature_projection, enc.transformer.pos_conv_embed],
                list(enc.transformer.layers))

    def always_frozen_modules(self) -> list[nn.Module]:
        return [self.wav2vec2.feature_extractor] if self.model_config.get("freeze_feature_encoder") else []

    def _mask(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        c = self.model_config
        if c["mask_time_prob"] > 0:
            m = _span_mask(lens.cpu(), x.size(1), c["mask_time_prob"], c["mask_time_length"]).to(x.device)
            x = torch.where(m[:, :, None], self.mask_embedding.to(x.dtype), x)
        if c["mask_feature_prob"] > 0:
            full = torch.full_like(lens.cpu(), x.size(2))
            m = _span_mask(full, x.size(2), c["mask_feature_prob"], c["mask_feature_length"]).to(x.device)
            x = x.masked_fill(m[:, None, :], 0.0)
        return x

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor,
                normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats``: ``wave_frontend``'s (B, S, 1) output (or (B, S) waveforms); ``normalized`` is ignored."""
        waves = feats.squeeze(-1) if feats.dim() == 3 else feats
        w2v = self.wav2vec2
        frozen_cnn = not any(p.requires_grad for p in w2v.feature_extractor.parameters())
        with torch.no_grad() if frozen_cnn else contextlib.nullcontext():
            x, lens = w2v.feature_extractor(waves, feat_lens)
        x = w2v.encoder.feature_projection(x)
        if self.training:
            x = self._mask(x, lens)
        pad = ~lengths_to_mask(lens, x.size(1))
        x = x.masked_fill(pad[:, :, None], 0.0)
        attn = (-10000.0 * pad[:, None, None, :].to(x.dtype)).expand(x.size(0), 1, x.size(1), x.size(1))
        tr = w2v.encoder.transformer
        x = tr._preprocess(x)
        use_ckpt = self.model_config.get("gradient_checkpointing") and self.training and torch.is_grad_enabled()
        for layer in tr.layers:
            if self.training and tr.layer_drop > 0 and torch.rand(1).item() <= tr.layer_drop:
                continue
            if use_ckpt and any(p.requires_grad for p in layer.parameters()):
                x, _ = checkpoint(layer, x, attn, use_reentrant=False)
            else:
                x, _ = layer(x, attn)
        if not tr.layer_norm_first:
            x = tr.layer_norm(x)
        logits = self.head(self.dropout(x))
        return logits.float().log_softmax(-1), lens


def _torchaudio_model(cfg: dict[str, Any]) -> nn.Module:
    if cfg.get("arch_params"):
        params = dict(cfg["arch_params"])
        unknown = sorted(set(params) - _ARCH_PARAM_KEYS)
        if unknown:
            raise ValueError(f"wav2vec2 arch_params: unknown key(s) {unknown}; known: {sorted(_ARCH_PARAM_KEYS)}")
        if params.get("extractor_conv_layer_config") is not None:
            params["extractor_conv_layer_config"] = [tuple(x) for x in params["extractor_conv_layer_config"]]
        return torchaudio.models.wav2vec2_model(**params, aux_num_out=None)
    arch = cfg.get("arch")
    if arch == "tiny":
        return _torchaudio_model({"arch_params": TINY_ARCH})
    if arch in ARCH_FACTORIES:
        return getattr(torchaudio.models, arch)(aux_num_out=None)
    raise ValueError(f"wav2vec2 needs a checkpoint, arch_params or arch (one of {['tiny', *ARCH_FACTORIES]}), "
                     f"got arch={arch!r}")


# ------------------------------------------------------------------------------------------------ loading

def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").exists():
            return "huggingface"
        raise CheckpointError(f"{path}: a folder without config.json; expected a Hugging Face wav2vec2/HuBERT "
                              "folder (or give a torchaudio state dict file)")
    return "torchaudio"


def _hf_config(folder: Path) -> dict[str, Any]:
    cfg = read_json(folder / "config.json", "a Hugging Face wav2vec2/HuBERT config.json")
    if cfg.get("model_type") not in ("wav2vec2", "hubert"):
        raise CheckpointError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r}; expected "
                              "'wav2vec2' or 'hubert'")
    return cfg


@contextlib.contextmanager
def _offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_hf(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None, bool | None]:
    """(arch_params, torchaudio state dict, mask embedding or None, do_normalize or None) from an HF folder."""
    cfg = _hf_config(folder)
    try:
        import transformers
        from torchaudio.models.wav2vec2.utils import import_huggingface_model
        from torchaudio.models.wav2vec2.utils.import_huggingface import _get_config
    except ImportError as e:
        raise CheckpointError(f"{folder}: reading a Hugging Face wav2vec2/HuBERT folder needs transformers ({e})") from None
    cls = transformers.HubertModel if cfg["model_type"] == "hubert" else transformers.Wav2Vec2Model
    try:
        with _offline():
            hf = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs the path and cause
        raise CheckpointError(f"{folder}: cannot load as a Hugging Face {cls.__name__}: {e}") from None
    hf.eval()
    imported = import_huggingface_model(hf)
    arch = _get_config(hf.config)
    arch["extractor_conv_layer_config"] = [list(x) for x in arch["extractor_conv_layer_config"]]
    mask = getattr(hf, "masked_spec_embed", None)
    mask = mask.detach().float().clone() if isinstance(mask, torch.Tensor) else None
    do_normalize = None
    if (folder / "preprocessor_config.json").exists():
        do_normalize = bool(read_json(folder / "preprocessor_config.json", "a preprocessor config").get("do_normalize"))
    state = {k: v for k, v in imported.state_dict().items() if not k.startswith("aux.")}
    return arch, state, mask, do_normalize


def _load_torchaudio_file(path: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor], torch.Tensor | None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read as a torchaudio wav2vec2 state dict: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}; expected a state dict or "
                              "{'config': ..., 'state_dict': ...}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a torchaudio Wav2Vec2Model state dict)")
    mask = state.get("mask_embedding")
    state = {k: v for k, v in state.items() if not k.startswith("aux.") and k != "mask_embedding"}
    if not any(k.startswith("feature_extractor.") for k in state):
        raise CheckpointError(f"{path}: no feature_extractor.* tensors; expected a torchaudio Wav2Vec2Model state dict")
    return config, state, mask


def read_wav2vec2_arch(c: dict[str, Any]) -> tuple[dict[str, Any] | None, bool | None]:
    p = require_path(c["checkpoint"], "a Hugging Face wav2vec2/HuBERT folder or a torchaudio state dict file")
    fmt = detect_format(p) if c["checkpoint_format"] == "auto" else c["checkpoint_format"]
    if fmt == "huggingface":
        from torchaudio.models.wav2vec2.utils.import_huggingface import _get_config
        from types import SimpleNamespace

        cfg = _hf_config(p)
        try:
            import transformers

            fields = {k: v for k, v in cfg.items() if k != "model_type"}
            hf_cfg = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
        except Exception:  # noqa: BLE001 - fall back to the raw fields (save_pretrained writes them all)
            hf_cfg = SimpleNamespace(**cfg)
        arch = _get_config(hf_cfg)
        arch["extractor_conv_layer_config"] = [list(x) for x in arch["extractor_conv_layer_config"]]
        norm = None
        if (p / "preprocessor_config.json").exists():
            norm = bool(read_json(p / "preprocessor_config.json", "a preprocessor config").get("do_normalize"))
        return arch, norm
    config, _, _ = _load_torchaudio_file(p)
    return config, None


def resolve_wav2vec2_config(cfg: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(cfg) - set(WAV2VEC2_DEFAULTS) - {"name"})
    if unknown:
        raise ValueError(f"unknown wav2vec2 model option(s) {unknown}; known: {sorted(WAV2VEC2_DEFAULTS)}")
    c = {"name": "wav2vec2", **WAV2VEC2_DEFAULTS, **{k: v for k, v in cfg.items() if k != "name"}}
    if c["checkpoint_format"] not in ("auto", "huggingface", "torchaudio"):
        raise ValueError(f"checkpoint_format must be auto, huggingface or torchaudio, got {c['checkpoint_format']!r}")
    if c["checkpoint"]:
        c["checkpoint"] = str(c["checkpoint"])
        if not c["arch_params"] or c["normalize_waveform"] is None:
            arch, norm = read_wav2vec2_arch(c)
            if not c["arch_params"] and arch is not None:
                c["arch_params"] = arch
            if c["normalize_waveform"] is None and norm is not None:
                c["normalize_waveform"] = norm
    if not c["arch_params"] and c["arch"] is None:
        raise ValueError(f"wav2vec2: {'checkpoint ' + c['checkpoint'] + ' has no config, so ' if c['checkpoint'] else ''}"
                         f"give arch (one of {['tiny', *ARCH_FACTORIES]}) or arch_params")
    if c["normalize_waveform"] is None:
        c["normalize_waveform"] = False
    return c


def build_wav2vec2_model(c: dict[str, Any], vocab_size: int, load_weights: bool = True) -> Wav2Vec2CTC:
    model = Wav2Vec2CTC(c, vocab_size)
    if load_weights and c.get("checkpoint"):
        p = require_path(c["checkpoint"], "a Hugging Face wav2vec2/HuBERT folder or a torchaudio state dict file")
        fmt = detect_format(p) if c["checkpoint_format"] == "auto" else c["checkpoint_format"]
        if fmt == "huggingface":
            _, state, mask, _ = _load_hf(p)
        else:
            _, state, mask = _load_torchaudio_file(p)
        expected = {k: tuple(v.shape) for k, v in model.wav2vec2.state_dict().items()}
        check_shapes(p, expected, state, "the wav2vec2 architecture of the model config")
        extra = sorted(set(state) - set(expected))
        if extra:
            raise CheckpointError(f"{p}: unexpected tensor(s) {extra[:6]} for a torchaudio Wav2Vec2Model")
        model.wav2vec2.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        if mask is not None:
            if tuple(mask.shape) != tuple(model.mask_embedding.shape):
                raise CheckpointError(f"{p}: mask embedding of shape {tuple(mask.shape)}, expected "
                                      f"{tuple(model.mask_embedding.shape)}")
            with torch.no_grad():
                model.mask_embedding.copy_(mask)
            model._mask_embedding_loaded = True
        model.model_config["checkpoint_format"] = fmt
        log.info("wav2vec2: loaded %d tensors from %s (%s)", len(state), p, fmt)
    return model
