"""One params object for a training run, read from the workflow config's ``training`` section."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainParams:
    variant: str = "full"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "conformer"})
    init_from: str | None = None         # an earlier asrflow model.pt to start a fresh run from (not on resume)
    encoder_cache: bool = False          # train the head on cached frozen-encoder outputs (rule encoder_cache)
    n_mels: int = 80
    epochs: int = 30
    max_steps: int = 0                  # 0: no limit
    time_budget_minutes: float = 0.0    # 0: no limit; else stop cleanly after this much training time
    lr: float = 1e-3                    # per worker; scaled by the number of workers
    lr_scale_with_workers: bool = True
    warmup_steps: int = 200
    lr_decay: str = "cosine"            # cosine | constant | noam
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-3
    grad_clip: float = 5.0
    precision: str = "auto"             # auto | fp32 | bf16 | fp16
    loss: dict[str, Any] = field(default_factory=lambda: {"kind": "smoothed", "smoothing": 0.1})
    specaugment: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "freq_mask_param": 15,
                                                                  "time_mask_param": 30, "n_freq_masks": 2,
                                                                  "n_time_masks": 2, "max_time_ratio": 0.2})
    noise: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "p": 0.5, "snr_db": [0.0, 20.0]})
    # vocal tract length perturbation of log-mel features (augment.VocalTractLengthPerturb); off by default
    vtlp: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "factors": [0.9, 1.1],
                                                           "boundary_hz": 4800.0, "p": 1.0})
    # random filtering of log-mel features (augment.FilterAugment: a random equalizer per utterance); off by default
    filter_augment: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "db_range": [-6.0, 6.0],
                                                                     "n_points": [2, 5], "p": 1.0})
    # the running mean of the run's own weights (train.weight_average), exported instead of the best checkpoint
    weight_average: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "start_step": 1, "every": 1})
    # a classifier of the training voices on the encoder's output, which the encoder learns to confuse (train.adversary); off by default
    voice_adversary: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "weight": 0.1, "label": "voice",
                                                                      "hidden": 256, "ramp_steps": 200})
    augment_after_steps: int = 0         # noise, speed perturbation, SpecAugment, VTLP and filtering start here
    speed_perturb: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "factors": [0.9, 1.0, 1.1]})
    oversample_temperature: float = 2.0  # 1 or 0: off
    class_weight_power: float = 0.0      # 0: off; 0.5: weights ∝ 1/sqrt(dialect frequency)
    bucketing: bool = True               # False: random batches under the same frame budget
    sortagrad_epochs: int = 1            # first epochs ordered shortest batch first (Deep Speech 2's SortaGrad)
    sync_batchnorm: bool = False         # True: hvd.SyncBatchNorm; else BN stats averaged each epoch
    checkpoint_every_steps: int = 200
    keep_last: int = 3
    early_stopping_patience: int = 0     # epochs without dev-loss improvement; 0: off
    threads_per_rank: int = 1
    loader_workers: int = 1              # DataLoader worker processes per rank reading audio (0: in-process)
    prefetch_factor: int = 4             # batches each worker reads ahead
    persistent_workers: bool = True      # keep workers across epochs (no re-fork per epoch)
    log_every: int = 10
    dev_max_utterances: int = 0          # 0: the whole dev set
    train_cer_utterances: int = 100      # training utterances scored like dev each epoch (train vs dev CER); 0: off
    seed: int = 1234

    @classmethod
    def from_config(cls, cfg: dict[str, Any], seed: int | None = None) -> "TrainParams":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        p = cls(**cfg)
        if seed is not None and "seed" not in cfg:
            p.seed = seed
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint_spec(self, vocab_symbols: list[str], plan_digest: str) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed: model, units, data and the recipe itself.
        Stopping criteria (epochs, steps, time, patience) may change between a run and its resume."""
        spec = self.to_dict()
        for k in ("epochs", "max_steps", "time_budget_minutes", "early_stopping_patience", "log_every",
                  "checkpoint_every_steps", "keep_last", "threads_per_rank", "dev_max_utterances",
                  "loader_workers", "prefetch_factor", "persistent_workers", "train_cer_utterances"):
            spec.pop(k)
        if not spec["vtlp"].get("enabled"):  # off: the spec of checkpoints written before VTLP existed, so they resume
            spec.pop("vtlp")
        if not spec["filter_augment"].get("enabled"):  # likewise for checkpoints written before random filtering
            spec.pop("filter_augment")
        if not spec["weight_average"].get("enabled"):  # likewise for checkpoints written before weight averaging
            spec.pop("weight_average")
        if not spec["voice_adversary"].get("enabled"):  # likewise for checkpoints written before the voice adversary
            spec.pop("voice_adversary")
        return {"params": spec, "vocab": vocab_symbols, "plan": plan_digest}
