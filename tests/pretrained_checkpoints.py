"""Tiny random pretrained checkpoints, written in the layouts `asrflow.train.pretrained` reads: a Hugging Face
Whisper folder, a CTranslate2 Whisper folder (our own writer, no ctranslate2 needed) and a Hugging Face
wav2vec2/HuBERT folder. Shared by the unit tests (tests/train/test_pretrained.py), the benchmark test and the
workflow test, which all need the same small models."""
from __future__ import annotations

from pathlib import Path

import torch

# max_source_positions=50: Hugging Face's WhisperEncoder wants exactly 2 * 50 = 100 input frames
TINY_WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                    decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50,
                    vocab_size=60, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    decoder_start_token_id=1)
# Whisper's own positions: 1500 encoder frames = 30 s, so a workflow on real utterances (up to 15 s) fits
WHISPER_30S_POSITIONS = 1500
TINY_W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4, vocab_size=10, hidden_dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (fresh inits have all-zero biases and unit norms, which hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_gain = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if norm_gain else 0.0))


def write_hf_whisper(folder: Path, max_source_positions: int = TINY_WHISPER["max_source_positions"], seed: int = 1):
    """(folder, the transformers model) of a tiny random WhisperForConditionalGeneration, safetensors layout."""
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(**{**TINY_WHISPER, "max_source_positions": max_source_positions})
    model = transformers.WhisperForConditionalGeneration(config).eval()
    randomize(model.model.encoder, seed)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return Path(folder), model


def write_hf_w2v(folder: Path, class_name: str = "Wav2Vec2Model"):
    """(folder, the transformers model) of a tiny random Wav2Vec2Model or HubertModel."""
    import transformers

    cls = getattr(transformers, class_name)
    config_cls = transformers.HubertConfig if class_name == "HubertModel" else transformers.Wav2Vec2Config
    torch.manual_seed(0)
    model = cls(config_cls(**TINY_W2V)).eval()
    model.save_pretrained(folder)
    return Path(folder), model


def write_tiny_ct2_whisper(folder: Path, seed: int = 0, max_positions: int = 50):
    """A tiny random Whisper encoder as a CTranslate2 model.bin, written by our own writer (no transformers);
    ``max_positions`` output frames of 20 ms are the longest input it takes."""
    from asrflow.train.pretrained.checkpoints import write_ct2_model_bin
    from asrflow.train.pretrained.whisper import WhisperEncoder, encoder_to_ct2_variables

    torch.manual_seed(seed)
    encoder = WhisperEncoder(80, 32, 2, 4, 64, max_positions)
    randomize(encoder, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_ct2_model_bin(folder / "model.bin", encoder_to_ct2_variables(encoder, 4))
    return folder, encoder
