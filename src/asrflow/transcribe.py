"""Transcribe audio files with a trained asrflow model: any sample rate, mono or stereo, any level.

    asrflow-transcribe --model results/train/full/model.pt my_recording.wav [--lm results/lm/words.arpa]
    asrflow-transcribe --model results/train/full/model.pt --decoding results/eval/full/decoding.json my.wav

``--decoding`` takes the decoding the evaluation chose on dev (greedy's blank penalty; the LM, its
lexicon, weights and beam), so a recording is decoded as the reported figures were; flags override it.

Every file goes through the front end training audio went through in prep (``asrflow.loudness``):
mono, the model's sample rate, and loudness normalization of active speech to the target stored in
the model (``frontend`` in ``model.pt``), so a recording made 20 dB quieter reads the same.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from asrflow.audio import read_audio
from asrflow.loudness import Frontend, prepare_waveform
from asrflow.text import CharVocab, vocab_from_dict
from asrflow.train.features import LogMel
from asrflow.train.models import AcousticModel, build_model


class Recognizer(torch.nn.Module):
    """Waveform (16 kHz) in, CTC log-probs out: the log-mel front end and the acoustic model together.

    ``frontend`` says what the waveform must have been through first (:func:`load_for_model` applies it).
    """

    def __init__(self, logmel: LogMel, acoustic: AcousticModel, vocab: CharVocab, sample_rate: int = 16000,
                 frontend: Frontend | None = None):
        super().__init__()
        self.logmel, self.acoustic, self.vocab = logmel, acoustic, vocab
        self.frontend = frontend or Frontend(sample_rate=sample_rate)
        self.sample_rate = self.frontend.sample_rate

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, feat_lens = self.logmel(waves, lengths)
        return self.acoustic(feats, feat_lens)


def load_model(path: str | Path, device: str | torch.device = "cpu", frontend_defaults: Frontend | None = None) -> Recognizer:
    """The exported model; its front end from the checkpoint's ``frontend`` entry, else ``frontend_defaults``
    (else the prep defaults), for models exported before the entry existed."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    vocab = vocab_from_dict(ckpt["vocab"])
    # load_weights=False: a pretrained model's checkpoint is not needed, model.pt holds all its weights
    acoustic = build_model(ckpt["model_config"], len(vocab), ckpt["n_mels"], load_weights=False)
    if any(k.startswith("cmvn.") for k in ckpt["model"]):
        from asrflow.train.features import GlobalCMVN

        n = ckpt["n_mels"]
        acoustic.cmvn = GlobalCMVN(torch.zeros(n), torch.ones(n))
    acoustic.load_state_dict(ckpt["model"])
    frontend = Frontend.from_checkpoint(ckpt, frontend_defaults)
    logmel = getattr(acoustic, "wave_frontend", None) or LogMel(ckpt["n_mels"])  # pretrained models bring theirs
    model = Recognizer(logmel, acoustic, vocab, frontend.sample_rate, frontend)
    return model.to(device).eval()


def load_for_model(path: str | Path, frontend: Frontend | int | None = None) -> torch.Tensor:
    """Read any file soundfile can read; mono, the model's rate and loudness as in prep.

    ``frontend`` is the model's (``model.frontend``); an int is taken as the sample rate with the
    default normalization; None means the defaults.
    """
    if isinstance(frontend, int):
        frontend = Frontend(sample_rate=frontend)
    samples, sr = read_audio(path, mono=True)
    return prepare_waveform(samples, sr, frontend)


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
               lm_weight: float = 1.0, word_score: float = 0.0, beam_size: int = 50, lexicon: str = "none",
               cmudict_path: str | Path | None = None, blank_penalty: float = 0.0,
               beam_size_token: int | None = None, adaptation: dict | None = None) -> list[str]:
    """Greedy without ``lm_path`` (``blank_penalty``: see ``greedy_decode``); else LM beam search,
    lexicon-free (``lexicon="none"``) or over the LM's words (``"lm_vocab"``) plus the CMU dictionary's
    (``"cmudict"``). ``adaptation``: test-time adaptation to each file first (asrflow.evaluate.adaptation)."""
    from asrflow.evaluate.adaptation import AdaptSettings, adapted_log_probs
    from asrflow.evaluate.decoding import BeamSearchDecoder, LexiconBeamSearchDecoder, greedy_decode, lexicon_words

    waves = [load_for_model(p, model.frontend) for p in paths]
    adapt = AdaptSettings.from_dict(adaptation)
    if adapt.enabled:  # each file on its own, from the trained weights
        rows = [adapted_log_probs(model, w, adapt) for w in waves]
        out_lens = torch.tensor([len(r) for r in rows])
        log_probs = torch.zeros(len(rows), int(out_lens.max()), rows[0].size(-1))
        for i, r in enumerate(rows):
            log_probs[i, : len(r)] = r
    else:
        log_probs, out_lens = emissions(model, waves)
    if lm_path is None:
        return greedy_decode(log_probs, out_lens, model.vocab, blank_penalty)
    if lexicon != "none":
        decoder = LexiconBeamSearchDecoder(model.vocab, lm_path, lexicon_words(lexicon, lm_path, cmudict_path),
                                           beam_size=beam_size, lm_weight=lm_weight, word_score=word_score,
                                           beam_size_token=beam_size_token)
    else:
        decoder = BeamSearchDecoder(model.vocab, lm_path=str(lm_path), beam_size=beam_size, lm_weight=lm_weight,
                                    word_score=word_score, beam_size_token=beam_size_token)
    return decoder.decode(log_probs, out_lens)


# transcribe()'s decoding options and their values when neither --decoding nor a flag sets them
DECODING_DEFAULTS = {"lm": None, "lexicon": "none", "cmudict": None, "lm_weight": 1.0, "word_score": 0.0,
                     "beam_size": 50, "beam_size_token": None, "blank_penalty": 0.0, "adaptation": None}


def decoding_options(decoding_file: str | Path | None, flags: dict) -> dict:
    """The defaults, then the evaluation's ``decoding.json`` (its LM path is relative to the file), then
    every flag given (None: not given); ``flags["no_lm"]`` drops the LM (greedy, with the file's penalty)."""
    opts = dict(DECODING_DEFAULTS)
    if decoding_file is not None:
        path = Path(decoding_file)
        if not path.is_file():
            raise SystemExit(f"--decoding {path}: no such file "
                             "(the evaluation writes results/eval/<variant>/decoding.json)")
        saved = json.loads(path.read_text())
        if flags.get("no_lm"):
            saved.pop("lm", None)
        if saved.get("lm"):
            saved["lm"] = str(path.parent / saved["lm"])
            if not Path(saved["lm"]).is_file():
                raise SystemExit(f"--decoding {path} names the LM {saved['lm']}, which does not exist "
                                 "(give --lm, or --no-lm for greedy decoding)")
        opts.update({k: v for k, v in saved.items() if k in opts})
    opts.update({k: v for k, v in flags.items() if k in opts and v is not None})
    if flags.get("no_lm"):
        opts["lm"] = None
    given = {k: flags.get(f"adapt_{k}") for k in ("steps", "lr") if flags.get(f"adapt_{k}") is not None}
    if given:  # --adapt-steps 0 turns the file's adaptation off
        from asrflow.evaluate.adaptation import AdaptSettings

        opts["adaptation"] = {**(opts["adaptation"] or AdaptSettings().to_dict()), **given}
    return opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Transcribe audio files with a trained asrflow model.")
    ap.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3; any rate; mono or stereo)")
    ap.add_argument("--model", required=True, help="model.pt written by the training rule")
    ap.add_argument("--decoding", default=None,
                    help="decoding.json of the evaluation (results/eval/<variant>/): decode as it did, with what it "
                         "chose on dev; the flags below override it")
    ap.add_argument("--lm", default=None, help="word n-gram LM (ARPA) for beam search; greedy without it")
    ap.add_argument("--no-lm", action="store_true", help="greedy decoding even if --decoding names an LM")
    ap.add_argument("--lm-weight", type=float, default=None, help="default 1.0")
    ap.add_argument("--word-score", type=float, default=None, help="default 0.0")
    ap.add_argument("--beam-size", type=int, default=None, help="default 50")
    ap.add_argument("--beam-size-token", type=int, default=None, help="default: every token")
    ap.add_argument("--lexicon", choices=["none", "lm_vocab", "cmudict"], default=None,
                    help="with --lm: lexicon-free search (default), or only the LM's words (plus the CMU dictionary's)")
    ap.add_argument("--cmudict", default=None, help="CMU dictionary file (default: the pocketsphinx package's)")
    ap.add_argument("--blank-penalty", type=float, default=None,
                    help="greedy: subtracted from blank's log-probability on every frame (default 0)")
    ap.add_argument("--adapt-steps", type=int, default=None,
                    help="test-time adaptation: this many entropy-minimization steps on each file before decoding "
                         "(0: none; default: what --decoding chose on dev, else none)")
    ap.add_argument("--adapt-lr", type=float, default=None,
                    help="test-time adaptation's learning rate (default: --decoding's, else 1e-5)")
    args = ap.parse_args(argv)
    opts = decoding_options(args.decoding, vars(args))
    model = load_model(args.model)
    texts = transcribe(model, args.audio, opts["lm"], opts["lm_weight"], opts["word_score"], opts["beam_size"],
                       lexicon=opts["lexicon"], cmudict_path=opts["cmudict"], blank_penalty=opts["blank_penalty"],
                       beam_size_token=opts["beam_size_token"], adaptation=opts["adaptation"])
    for path, text in zip(args.audio, texts):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
