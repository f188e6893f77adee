"""The frozen-encoder output cache (issue 12): a frozen pretrained encoder's output for every training
and dev utterance, computed once (rule ``encoder_cache``), so that a run with ``freeze: all`` trains
its head alone (``training.<variant>.encoder_cache: true``).

Why: with the whole encoder frozen, every step recomputes the same function of the same audio, and the
encoder is most of the step (Whisper tiny.en: 8M of 8.5M parameters, every frame through 4 attention
blocks). Computed once, a frozen run's steps cost the head's forward and backward only.

What a cached run cannot do, and refuses at start (``check_recipe``): anything that changes the
encoder's input or weights. Noise, speed perturbation and SpecAugment act before the encoder, so the
cached outputs are those of the clean, unmasked prepared audio; and unfreezing would make them stale.

Layout (one folder):

* ``frames.f16``: every utterance's encoder frames back to back, ``(n_frames, d_model)`` float16, read
  through a memory map: a loader worker reads only its batch's rows, never the whole file (the same
  streaming promise as the audio path; float16 halves the disk, as CTranslate2 stores weights).
* ``index.json``: ``{"utterances": {id: [first_row, n_rows]}, "d_model", "n_frames", "dtype",
  "encoder": <the encoder's resolved config>}``. The trainer refuses a cache whose encoder config differs
  from its model's, or that lacks one of its utterances.

Each utterance is encoded alone, unpadded: its cached frames do not depend on what it was batched with.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger("asrflow.train")

FRAMES_FILE = "frames.f16"
INDEX_FILE = "index.json"
# Model options that change only the head or the training, not what the encoder computes: a cache stays
# valid when they change.
HEAD_ONLY_KEYS = frozenset({"dropout", "head_lstm_layers", "head_lstm_hidden", "freeze", "unfreeze_after_steps",
                            "unfreeze_warmup_steps", "frozen_after_unfreeze", "pretrained_lr_scale", "pretrained_lr_decay",
                            "gradient_checkpointing", "encoder_dropout", "attention_dropout"})


class EncoderCacheError(ValueError):
    """A cache that does not fit the run (missing, stale, incomplete, or a recipe it cannot serve)."""


def encoder_identity(model_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved model config that decides the encoder's outputs."""
    return {k: v for k, v in sorted(model_config.items()) if k not in HEAD_ONLY_KEYS}


def check_recipe(params) -> None:
    """Refuse a recipe a cache cannot serve, naming the option to change."""
    model = params.model
    if model.get("name") != "whisper_encoder":
        raise EncoderCacheError(f"encoder_cache: needs model.name whisper_encoder, got {model.get('name')!r}")
    if model.get("freeze") != "all":
        raise EncoderCacheError(f"encoder_cache: needs model.freeze: all (the cached encoder never trains), "
                                f"got {model.get('freeze', 'none')!r}")
    if int(model.get("unfreeze_after_steps") or 0):
        raise EncoderCacheError("encoder_cache: model.unfreeze_after_steps must be 0 (an unfrozen encoder makes "
                                "the cache stale); train the frozen phase cached, then init_from its model.pt")
    if int(model.get("phone_ctc_layer") or 0):
        raise EncoderCacheError("encoder_cache: model.phone_ctc_layer is set, but the cache holds the frozen encoder's "
                                "output only, and a frozen encoder learns nothing from a phone head; drop one of them")
    on = [name for name in ("noise", "speed_perturb", "specaugment", "vtlp", "filter_augment") if getattr(params, name).get("enabled")]
    if on:
        raise EncoderCacheError(f"encoder_cache: the cached outputs are of the clean, unmasked audio, so "
                                f"{', '.join(on)} cannot apply; set {', '.join(f'{n}.enabled: false' for n in on)} "
                                "for this variant (or drop encoder_cache)")


class EncoderCache:
    """Reads cached frames; opens its memory map lazily, so it pickles cheaply into loader workers."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.exists() or not (self.folder / FRAMES_FILE).exists():
            raise EncoderCacheError(f"{self.folder}: no encoder cache here (expected {INDEX_FILE} and "
                                    f"{FRAMES_FILE}; run the rule encoder_cache)")
        meta = json.loads(index_path.read_text())
        self.rows: dict[str, tuple[int, int]] = {k: (int(a), int(n)) for k, (a, n) in meta["utterances"].items()}
        self.d_model, self.n_frames, self.encoder = int(meta["d_model"]), int(meta["n_frames"]), meta["encoder"]
        self._frames: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frames": None}

    def check(self, model_config: dict[str, Any], ids: Sequence[str]) -> None:
        want = encoder_identity(model_config)
        if self.encoder != want:
            diff = sorted(k for k in set(want) | set(self.encoder) if want.get(k) != self.encoder.get(k))
            raise EncoderCacheError(f"{self.folder}: cached for another encoder (differs in {diff}); rerun the "
                                    "rule encoder_cache")
        missing = [i for i in ids if i not in self.rows]
        if missing:
            raise EncoderCacheError(f"{self.folder}: {len(missing)} utterance(s) not cached, e.g. {missing[:3]}; "
                                    "rerun the rule encoder_cache")

    def frames(self) -> np.memmap:
        if self._frames is None:
            self._frames = np.memmap(self.folder / FRAMES_FILE, dtype=np.float16, mode="r",
                                     shape=(self.n_frames, self.d_model))
        return self._frames

    def read(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, T', d_model) float32, zero-padded; lens (B,))."""
        frames = self.frames()
        spans = [self.rows[i] for i in ids]
        lens = torch.tensor([n for _, n in spans], dtype=torch.long)
        out = torch.zeros(len(ids), max(1, int(lens.max())), self.d_model)
        for row, (first, n) in enumerate(spans):
            out[row, :n] = torch.from_numpy(np.asarray(frames[first:first + n], dtype=np.float32))
        return out, lens


@torch.no_grad()
def encode_utterances(model: torch.nn.Module, index, ids: Sequence[str], folder: Path) -> dict[str, Any]:
    """Encode ``ids`` one at a time into ``folder`` (written under temporary names, then renamed, so an
    interrupted run leaves no cache that looks complete). Returns the index written."""
    from asrflow.train.data import read_samples

    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    tmp_frames, tmp_index = folder / f".{FRAMES_FILE}.tmp", folder / f".{INDEX_FILE}.tmp"
    rows: dict[str, list[int]] = {}
    n_frames, d_model = 0, None
    with open(tmp_frames, "wb") as fh:
        for k, uid in enumerate(ids):
            wave = torch.from_numpy(read_samples(index[uid].audio))[None]
            feats, feat_lens = model.wave_frontend(wave, torch.tensor([wave.shape[1]]))
            hidden, lens = model.encode(feats, feat_lens)
            h = hidden[0, : int(lens[0])].float().numpy().astype(np.float16)
            d_model = h.shape[1]
            fh.write(np.ascontiguousarray(h).tobytes())
            rows[uid] = [n_frames, int(h.shape[0])]
            n_frames += int(h.shape[0])
            if (k + 1) % 200 == 0:
                log.info("encoded %d/%d utterances (%d frames)", k + 1, len(ids), n_frames)
    meta = {"utterances": rows, "d_model": int(d_model or 0), "n_frames": n_frames, "dtype": "float16",
            "encoder": encoder_identity(model.model_config)}
    tmp_index.write_text(json.dumps(meta))
    os.replace(tmp_frames, folder / FRAMES_FILE)
    os.replace(tmp_index, folder / INDEX_FILE)
    return meta


def build_cache(manifest: Path, plan: Path, vocab: Path, params_config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The rule encoder_cache: the variant's model built from its checkpoint, the recipe checked, and
    every training and dev utterance the run will read encoded into ``out_dir``."""
    from asrflow.text import CharVocab
    from asrflow.train.models import build_model
    from asrflow.train.params import TrainParams
    from asrflow.train.run import load_index

    params = TrainParams.from_config(params_config)
    check_recipe(params)
    index, dev_ids = load_index(Path(manifest), Path(plan), params)
    model = build_model(params.model, len(CharVocab.load(vocab)), params.n_mels)
    meta = encode_utterances(model, index, index.ids(), Path(out_dir))
    log.info("cached %d utterances (%d training, %d dev), %d frames x %d, in %s", len(meta["utterances"]),
             len(index) - len(dev_ids), len(dev_ids), meta["n_frames"], meta["d_model"], out_dir)
    return {**meta, "dev_utterances": len(dev_ids)}
