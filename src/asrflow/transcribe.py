"""Transcribe audio files with a trained asrflow model: any sample rate, mono or stereo.

    asrflow-transcribe --model results/train/full/model.pt my_recording.wav [--lm results/lm/words.arpa]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchaudio

from asrflow.audio import read_audio
from asrflow.text import CharVocab, vocab_from_dict
from asrflow.train.features import LogMel
from asrflow.train.models import AcousticModel, build_model


class Recognizer(torch.nn.Module):
    """Waveform (16 kHz) in, CTC log-probs out: the log-mel front end and the acoustic model together."""

    def __init__(self, logmel: LogMel, acoustic: AcousticModel, vocab: CharVocab, sample_rate: int = 16000):
        super().__init__()
        self.logmel, self.acoustic, self.vocab, self.sample_rate = logmel, acoustic, vocab, sample_rate

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, feat_lens = self.logmel(waves, lengths)
        return self.acoustic(feats, feat_lens)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Recognizer:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    vocab = vocab_from_dict(ckpt["vocab"])
    acoustic = build_model(ckpt["model_config"], len(vocab), ckpt["n_mels"])
    if any(k.startswith("cmvn.") for k in ckpt["model"]):
        from asrflow.train.features import GlobalCMVN

        n = ckpt["n_mels"]
        acoustic.cmvn = GlobalCMVN(torch.zeros(n), torch.ones(n))
    acoustic.load_state_dict(ckpt["model"])
    model = Recognizer(LogMel(ckpt["n_mels"]), acoustic, vocab, ckpt.get("sample_rate", 16000))
    return model.to(device).eval()


def load_for_model(path: str | Path, sample_rate: int = 16000) -> torch.Tensor:
    """Read any file soundfile can read, average channels, resample to the model's rate."""
    samples, sr = read_audio(path, mono=True)
    wave = torch.from_numpy(samples)
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, sr, sample_rate)
    return wave


@torch.no_grad()
def emissions(model: Recognizer, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lens.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    device = next(model.parameters()).device
    log_probs, out_lens = model(batch.to(device), lens.to(device))
    return log_probs.float().cpu(), out_lens.cpu()


def transcribe(model: Recognizer, paths: list[str | Path], lm_path: str | Path | None = None,
               lm_weight: float = 1.0, word_score: float = 0.0, beam_size: int = 50) -> list[str]:
    from asrflow.evaluate.decoding import BeamSearchDecoder, greedy_decode

    waves = [load_for_model(p, model.sample_rate) for p in paths]
    log_probs, out_lens = emissions(model, waves)
    if lm_path is None:
        return greedy_decode(log_probs, out_lens, model.vocab)
    decoder = BeamSearchDecoder(model.vocab, lm_path=str(lm_path), beam_size=beam_size, lm_weight=lm_weight,
                                word_score=word_score)
    return decoder.decode(log_probs, out_lens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Transcribe audio files with a trained asrflow model.")
    ap.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3; any rate; mono or stereo)")
    ap.add_argument("--model", required=True, help="model.pt written by the training rule")
    ap.add_argument("--lm", default=None, help="word n-gram LM (ARPA) for beam search; greedy without it")
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--word-score", type=float, default=0.0)
    ap.add_argument("--beam-size", type=int, default=50)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    texts = transcribe(model, args.audio, args.lm, args.lm_weight, args.word_score, args.beam_size)
    for path, text in zip(args.audio, texts):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
