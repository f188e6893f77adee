"""CTC training under Horovod: the training loop, dev evaluation, checkpoints, MLflow on rank 0.

Structure follows icefall's train.py: small named functions around one ``TrainParams`` object, all
file and MLflow I/O on rank 0, every other rank logging to its own file.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from asrflow.text import CharVocab
from asrflow.train.adversary import MODULE_NAME as ADVERSARY, AdversarySettings, confusion_scale, utterance_label
from asrflow.train.augment import FilterAugment, NoiseInjector, SpecAugment, SpeedPerturb, VocalTractLengthPerturb
from asrflow.train.checkpoint import (fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint)
from asrflow.train.data import Batch, BatchLoader, UtteranceIndex
from asrflow.train.distributed import World, average_batchnorm_statistics
from asrflow.train.features import LogMel
from asrflow.train.models import batchnorm_modules
from asrflow.train.params import TrainParams
from asrflow.train.sampler import BucketBatchSampler
from asrflow.train.weight_average import WeightAverage
from asrflow.train.precision import autocast_context

log = logging.getLogger("asrflow.train")


@dataclass
class TrainState:
    """Everything that must survive a crash, besides model/optimizer/scaler weights."""
    epoch: int = 0
    batch_in_epoch: int = 0          # batches of `epoch` already done
    global_step: int = 0
    skipped_steps: int = 0
    best_dev_loss: float = math.inf
    epochs_without_improvement: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""


@dataclass
class Augmenters:
    noise: NoiseInjector | None
    speed: SpeedPerturb | None
    specaug: SpecAugment | None
    vtlp: VocalTractLengthPerturb | None = None
    # prep's loudness normalization, applied again after noise is mixed in: inference normalizes the
    # noisy recording it is given, so training must see noisy speech at that level too
    frontend: Any = None
    filter: FilterAugment | None = None

    def reseed(self, seed: int) -> None:
        """Per-step seeds: a resumed run draws exactly what an uninterrupted one would have."""
        for k, module in enumerate((self.noise, self.speed, self.specaug, self.vtlp)):
            if module is not None:
                module.generator.manual_seed(seed * 4 + k)
        if self.filter is not None:  # a stream of its own: the four above keep the seeds they always had
            self.filter.generator.manual_seed(int(np.random.SeedSequence([seed, 4]).generate_state(1, np.uint64)[0]) % 2**63)


def step_seed(params: TrainParams, epoch: int, batch_index: int, rank: int) -> int:
    return (params.seed * 1_000_003 + epoch * 100_003 + batch_index * 101 + rank) % (2**62)


def learning_rate(params: TrainParams, step: int, total_steps: int, world_size: int,
                  train_seconds: float = 0.0) -> float:
    """Linear warmup to lr x workers, then cosine (or noam/constant) decay. With a time budget the
    cosine runs over whichever ends first, the steps or the budget, so a budgeted run still anneals."""
    peak = params.lr * (world_size if params.lr_scale_with_workers else 1)
    warm = max(1, params.warmup_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if params.lr_decay == "constant":
        return peak
    if params.lr_decay == "noam":
        return peak * math.sqrt(warm / (step + 1))
    progress = (step - warm) / max(1, total_steps - warm)
    if params.time_budget_minutes:
        progress = max(progress, train_seconds / (params.time_budget_minutes * 60))
    progress = min(1.0, progress)
    return peak * (params.min_lr_ratio + (1 - params.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_augmenters(params: TrainParams, noise_manifest: Path | None, frontend: Any = None) -> Augmenters:
    noise = None
    if params.noise.get("enabled") and noise_manifest is not None:
        noise = NoiseInjector.from_noise_manifest(noise_manifest, "train", snr_db=tuple(params.noise["snr_db"]),
                              p=float(params.noise["p"]), seed=params.seed)
    speed = SpeedPerturb(params.speed_perturb["factors"], seed=params.seed) if params.speed_perturb.get("enabled") else None
    spec = None
    if params.specaugment.get("enabled"):
        opts = {k: v for k, v in params.specaugment.items() if k != "enabled"}
        spec = SpecAugment(**opts, seed=params.seed)
    vtlp = None
    if params.vtlp.get("enabled"):
        opts = {k: v for k, v in params.vtlp.items() if k != "enabled"}
        vtlp = VocalTractLengthPerturb(**opts, seed=params.seed)
    filter_aug = None
    if params.filter_augment.get("enabled"):
        opts = {k: v for k, v in params.filter_augment.items() if k != "enabled"}
        filter_aug = FilterAugment(**opts, seed=params.seed)
    return Augmenters(noise, speed, spec, vtlp, frontend if noise is not None else None, filter_aug)


def renormalize(waves: torch.Tensor, lens: torch.Tensor, frontend: Any) -> torch.Tensor:
    """Each utterance's real samples loudness-normalized as inference does (asrflow.loudness)."""
    out = waves.clone()
    for row, n in enumerate(lens.tolist()):
        out[row, :n] = torch.from_numpy(frontend.normalize(waves[row, :n].numpy()))
    return out


def features(batch: Batch, logmel: LogMel, model: torch.nn.Module, aug: Augmenters | None, device: torch.device):
    """Waveforms -> (augmented, normalized) log-mel on the device. Noise and speed act on the waveform,
    VTLP and random filtering on the log-mel before CMVN (VTLP interpolates between bands, whose scales CMVN
    makes unequal; a filter's gain in dB is a fixed offset only in log-mel units),
    SpecAugment on CMVN-normalized features (so its mask value 0 is the mean)."""
    waves, lens = batch.waves, batch.wave_lens
    if aug is not None and aug.noise is not None:
        waves = aug.noise(waves, lens).waves
        if aug.frontend is not None:
            waves = renormalize(waves, lens, aug.frontend)
    if aug is not None and aug.speed is not None:
        waves, lens, _ = aug.speed(waves, lens)
    frontend = getattr(model, "wave_frontend", None) or logmel  # a pretrained encoder brings its own
    feats, feat_lens = frontend(waves.to(device, non_blocking=True), lens.to(device, non_blocking=True))
    logmel_input = getattr(model, "feature_kind", "logmel") == "logmel"  # wav2vec2 takes waveforms
    if aug is not None and aug.vtlp is not None and logmel_input:
        feats = aug.vtlp(feats, feat_lens, frontend.band_centres_hz(), frontend.sample_rate / 2)
    if aug is not None and aug.filter is not None and logmel_input:
        feats = aug.filter(feats, feat_lens, frontend.units_per_db)
    if model.cmvn is not None:
        feats = model.cmvn(feats, feat_lens)
    if aug is not None and aug.specaug is not None and logmel_input:
        feats = aug.specaug(feats, feat_lens)  # wav2vec2 masks inside the model
    return feats, feat_lens


def forward_batch(model, batch: Batch, logmel, aug, device, amp_dtype):
    """(log_probs, out_lens) of one batch, for training and dev alike: from the frozen encoder's cached
    outputs when the batch carries them (only the head runs), else from its audio."""
    if batch.encoded is not None:
        with autocast_context(device, amp_dtype):
            return model.forward_encoded(batch.encoded.to(device, non_blocking=True),
                                         batch.encoded_lens.to(device, non_blocking=True))
    feats, feat_lens = features(batch, logmel, model, aug, device)
    with autocast_context(device, amp_dtype):
        return model(feats, feat_lens, normalized=True)


def compute_loss(model, loss_fn, batch: Batch, logmel, aug, device, amp_dtype, weights, inter_ctc_weight: float = 0.0,
                 phone_ctc_weight: float = 0.0, decoder_weight: float = 0.0):
    """The training loss of one batch. Auxiliary losses share the weight with the final CTC head:
    (1 - wi - wp - wd)·loss(final) + wi·loss(intermediate) + wp·loss(phones) + wd·CE(decoder), with an
    intermediate CTC head (``model.inter_ctc_layer``, Lee & Watanabe 2021), a phone CTC head
    (``model.phone_ctc_layer``, on the batch's espeak-ng phone targets, :mod:`asrflow.phones`) and
    Whisper's pretrained decoder (``model.decoder``, hybrid CTC/attention,
    :mod:`asrflow.train.pretrained.whisper_decoder`)."""
    log_probs, out_lens = forward_batch(model, batch, logmel, aug, device, amp_dtype)
    w = torch.tensor([weights[d] for d in batch.dialects], device=device) if weights else None
    targets, target_lens = batch.targets.to(device), batch.target_lens.to(device)
    out = loss_fn(log_probs.float(), out_lens, targets, target_lens, w)
    total, final_weight = 0.0, 1.0
    inter = getattr(model, "intermediate_log_probs", None)
    if inter is not None and inter_ctc_weight > 0:
        total = total + inter_ctc_weight * loss_fn(inter, out_lens, targets, target_lens, w).loss
        final_weight -= inter_ctc_weight
    phones = getattr(model, "phone_log_probs", None)
    if phones is not None and phone_ctc_weight > 0:
        if batch.phone_targets is None:
            raise ValueError("the model has a phone CTC head but the batch has no phone targets (--phones)")
        total = total + phone_ctc_weight * loss_fn(phones, out_lens, batch.phone_targets.to(device),
                                                   batch.phone_target_lens.to(device), w).loss
        final_weight -= phone_ctc_weight
    if decoder_weight > 0 and getattr(model, "decoder", None) is not None:
        if batch.texts is None:
            raise ValueError("the model has an auxiliary decoder but the batch carries no transcripts")
        with autocast_context(device, amp_dtype):
            total = total + decoder_weight * model.decoder_loss(batch.texts)
        final_weight -= decoder_weight
    out.loss = final_weight * out.loss + total
    return out


def auxiliary_ctc_weights(loss_cfg: dict) -> tuple[float, float, float]:
    """(intermediate CTC, phone CTC, decoder) weights of the loss config; together they must leave the final
    CTC head a positive weight."""
    inter, phone = float(loss_cfg.get("inter_ctc_weight", 0.0)), float(loss_cfg.get("phone_ctc_weight", 0.0))
    decoder = float(loss_cfg.get("decoder_weight", 0.0))
    if inter < 0 or phone < 0 or decoder < 0 or inter + phone + decoder >= 1:
        raise ValueError(f"loss.inter_ctc_weight ({inter}) + loss.phone_ctc_weight ({phone}) + loss.decoder_weight "
                         f"({decoder}) must be in [0, 1)")
    return inter, phone, decoder


def agree_on_step(value: torch.Tensor, world: World, stop_vote: bool = False) -> tuple[bool, bool]:
    """(every rank's loss is finite, rank 0 voted to stop), in one allreduce.

    Both are decisions all ranks must take together; carrying rank 0's time-budget vote in the
    finite check saves the step a collective round trip of its own (a broadcast_object is two).
    """
    flags = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0,
                          1.0 if (stop_vote and world.is_main) else 0.0])
    total = world.sum(flags, name="step_flags")
    return float(total[0]) == 0.0, float(total[1]) > 0.0


def augmenters_at(ctx: "Context", step: int) -> Augmenters | None:
    """The augmenters, or None before ``augment_after_steps``: CTC first finds its alignments on
    clean audio, which shortens the all-blank plateau (README, "Training")."""
    return ctx.aug if step >= ctx.params.augment_after_steps else None


def add_adversary_loss(ctx: "Context", out: Any, batch: Batch, step: int) -> None:
    """``out.loss`` += weight x (the voice classifier's cross-entropy + the encoder's confusion term, ramped in by
    ``step``) on this batch (asrflow.train.adversary); ``out.adversary`` = the classifier's cross-entropy (chance:
    ln of the number of voices). Nothing for a model without one."""
    adversary = getattr(ctx.model, ADVERSARY, None)
    if adversary is None:
        return
    s = AdversarySettings.from_dict(ctx.params.voice_adversary)
    if batch.voices is None or batch.speakers is None:
        raise ValueError("voice_adversary: the batch carries no speakers or voices")
    labels = [utterance_label(voice, speaker, s.label) for voice, speaker in zip(batch.voices, batch.speakers)]
    classify, confusion = adversary.loss(labels, confusion_scale(step, s.ramp_steps))
    out.adversary = classify.detach()
    out.loss = out.loss + s.weight * (classify + confusion)


@dataclass
class StepOutcome:
    out: Any                   # the loss output (loss, ctc, smooth)
    stepped: bool              # False: skipped on every rank (non-finite loss or gradient)
    grad_norm: torch.Tensor    # NaN when skipped before backward
    stop: bool                 # rank 0's stop vote, agreed by every rank


def training_step(ctx: "Context", batch: Batch, step: int = 0, stop_vote: bool = False) -> StepOutcome:
    """The one optimizer step of every mode (normal, elastic, benchmark): loss, the all-ranks finite
    check, backward, gradient allreduce, unscale, clip, step.

    Skip policy: a non-finite loss on any rank skips the step on every rank before backward (agreed in
    one allreduce, which also carries rank 0's ``stop_vote``); a non-finite gradient norm (the same on
    every rank after the allreduce) skips the update. A skipped batch leaves no trace: weights,
    optimizer state, and BatchNorm running statistics (which the forward pass already moved, maybe to
    NaN) are as if it never happened. With an fp16 GradScaler a skipped update backs the scale off.
    """
    world, opt = ctx.world, ctx.optimizer
    bns = ctx.batchnorms
    bn_saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    out = compute_loss(ctx.model, ctx.loss_fn, batch, ctx.logmel, augmenters_at(ctx, step), ctx.device, ctx.amp_dtype,
                       ctx.class_weights, *auxiliary_ctc_weights(ctx.params.loss))
    add_adversary_loss(ctx, out, batch, step)
    opt.zero_grad()
    stepped, grad_norm = False, torch.tensor(float("nan"))
    finite, stop = agree_on_step(out.loss.detach(), world, stop_vote)
    if finite:
        ctx.scaler.scale(out.loss).backward()
        world.synchronize(opt)
        ctx.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.params.grad_clip)
        if torch.isfinite(grad_norm):
            with world.skip_synchronize(opt):
                ctx.scaler.step(opt)
            stepped = True
        ctx.scaler.update()
    if not stepped:
        opt.zero_grad()
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, bn_saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    return StepOutcome(out, stepped, grad_norm, stop)


@dataclass
class StepRecord:
    """What one step of ``run_batches`` did, for its hooks (elastic commits, benchmark timing)."""
    index: int                 # the batch's position in the list given to run_batches
    batch: Batch
    outcome: StepOutcome
    step_seconds: float        # wall time of the whole step, loader wait included
    loader_wait_seconds: float
    cpu_seconds: float


StepHook = Callable[["Context", TrainState, StepRecord], None]


def prepare_step(ctx: "Context", state: TrainState, index: int) -> None:
    """Per-step seeds (dropout, noise, masks, speed) from (seed, epoch, batch, rank), the LR, and the
    freeze schedule of a pretrained encoder (every rank changes it on the same step)."""
    from asrflow.train.pretrained import apply_freeze_schedule, pretrained_lr_factor, register_unfrozen_parameters

    if apply_freeze_schedule(ctx.model, state.global_step):
        register_unfrozen_parameters(ctx.optimizer)
    seed = step_seed(ctx.params, state.epoch, index, ctx.world.rank)
    torch.manual_seed(seed)
    ctx.aug.reseed(seed)
    lr = learning_rate(ctx.params, state.global_step, ctx.total_steps, ctx.world.size, state.train_seconds)
    rewarm = pretrained_lr_factor(ctx.model, state.global_step)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0) * (rewarm if group.get("name") == "pretrained" else 1.0)


def run_batches(ctx: "Context", state: TrainState, batches: Sequence[Sequence[str]],
                hooks: Sequence[StepHook] = ()) -> bool:
    """The one epoch loop: ``batches[state.batch_in_epoch:]``, one ``training_step`` each, then logging,
    checkpoints and the stop criteria. Returns False when a stop criterion fired before the end.

    Normal training passes the sampler's epoch; elastic training the same, with a commit hook; the
    benchmark its own schedule, with a timing hook.
    """
    p, world = ctx.params, ctx.world
    ctx.model.train()
    window = Window()
    start = state.batch_in_epoch
    if start >= len(batches):
        return True
    ctx.loader.take_wait()
    t_step, c_step = time.perf_counter(), time.process_time()
    for index, batch in enumerate(ctx.loader.batches(batches[start:]), start):
        wait = ctx.loader.take_wait()
        prepare_step(ctx, state, index)
        outcome = training_step(ctx, batch, state.global_step, stop_vote=time_budget_spent(p, state.train_seconds))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        now, cpu_now = time.perf_counter(), time.process_time()
        record = StepRecord(index, batch, outcome, now - t_step, wait, cpu_now - c_step)
        t_step, c_step = now, cpu_now
        state.skipped_steps += 0 if outcome.stepped else 1
        state.batch_in_epoch = index + 1
        state.global_step += 1
        if ctx.weight_average is not None:  # before the checkpoint of this step, which carries the mean
            ctx.weight_average.update(ctx.model, state.global_step)
        state.train_seconds += record.step_seconds
        window.add(record)
        if state.global_step % p.log_every == 0 or index == len(batches) - 1:
            log_window(ctx, state, window)
            window = Window()
        if world.is_main and p.checkpoint_every_steps and state.global_step % p.checkpoint_every_steps == 0:
            save(ctx, state, is_best=False)
        for hook in hooks:
            hook(ctx, state, record)
        if should_stop(ctx, state, outcome.stop):
            return False
    return True


def train_one_epoch(ctx: "Context", state: TrainState, hooks: Sequence[StepHook] = ()) -> bool:
    """The rest of ``state.epoch`` under the bucket sampler; False when a stop criterion fired."""
    ctx.sampler.set_epoch(state.epoch)
    return run_batches(ctx, state, list(ctx.sampler), hooks)


class Window:
    """Sums over the steps between two log lines."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.utts = self.audio = self.loss = self.ctc = self.smooth = self.grad = self.wait = self.step_s = 0.0
        self.adversary = 0.0
        self.n = 0

    def add(self, r: StepRecord) -> None:
        out = r.outcome.out
        self.utts += len(r.batch.ids)
        self.audio += r.batch.audio_seconds
        self.loss += float(out.loss.detach())
        self.ctc += float(out.ctc.detach())
        self.smooth += float(out.smooth.detach())
        self.adversary += float(out.adversary) if getattr(out, "adversary", None) is not None else 0.0
        self.grad += float(r.outcome.grad_norm) if torch.isfinite(r.outcome.grad_norm) else 0.0
        self.wait += r.loader_wait_seconds
        self.step_s += r.step_seconds
        self.n += 1


def log_window(ctx: "Context", state: TrainState, w: Window) -> None:
    totals = ctx.world.sum(torch.tensor([w.utts, w.audio, w.loss, w.n], dtype=torch.float64), name="window")
    elapsed = max(1e-6, time.perf_counter() - w.t0)
    n = max(1.0, float(totals[3]))
    steps = max(1, w.n)
    metrics = {"train_loss": float(totals[2]) / n, "train_ctc": w.ctc / steps, "train_smooth": w.smooth / steps,
               "grad_norm": w.grad / steps, "lr": ctx.optimizer.param_groups[0]["lr"],
               "utt_per_s": float(totals[0]) / elapsed, "audio_s_per_s": float(totals[1]) / elapsed,
               "loader_wait_share": w.wait / max(1e-9, w.step_s), "skipped_steps": state.skipped_steps,
               "epoch": state.epoch}
    if getattr(ctx.model, ADVERSARY, None) is not None:  # near ln(classes): the encoder hides the voice
        metrics["train_adversary_ce"] = w.adversary / steps
    if ctx.world.is_main:
        log.info("epoch %d step %d loss %.3f lr %.2e workers %d %.1f utt/s loader wait %.1f%% skipped %d", state.epoch,
                 state.global_step, metrics["train_loss"], metrics["lr"], ctx.world.size, metrics["utt_per_s"],
                 100 * metrics["loader_wait_share"], state.skipped_steps)
        if "train_adversary_ce" in metrics:
            log.info("voice adversary cross-entropy %.3f (chance: %.3f)", metrics["train_adversary_ce"],
                     math.log(len(getattr(ctx.model, ADVERSARY).classes)))
        if ctx.tracker is not None:
            ctx.tracker.metrics(metrics, step=state.global_step)
        if ctx.progress is not None:
            ctx.progress.update(state.global_step - ctx.progress.n)
            ctx.progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", ups=f"{metrics['utt_per_s']:.1f}")


def time_budget_spent(params: TrainParams, train_seconds: float) -> bool:
    """This rank's clock against the budget (only rank 0's counts: ranks must stop on the same step)."""
    return bool(params.time_budget_minutes) and train_seconds >= params.time_budget_minutes * 60


def should_stop(ctx: "Context", state: TrainState, budget_spent: bool | None = None) -> bool:
    """Stop now? Every rank must answer the same on the same step.

    The step count is the same on every rank; the clock is rank 0's. ``budget_spent`` is rank 0's
    vote as the last training step agreed it (so a budgeted run stops one step after its budget ran
    out, with no extra collective); without it (between epochs) rank 0's answer is broadcast.
    """
    p = ctx.params
    reason = ""
    if p.max_steps and state.global_step >= p.max_steps:
        reason = f"max_steps {p.max_steps} reached"
    else:
        if budget_spent is None:
            budget_spent = time_budget_spent(p, state.train_seconds)
            if ctx.world.size > 1:
                budget_spent = bool(ctx.world.broadcast_object(budget_spent, name=f"stop.{state.global_step}"))
        if budget_spent:
            reason = f"time budget {p.time_budget_minutes} min reached"
    if reason:
        state.stop_reason = reason
    return bool(reason)


@torch.no_grad()
def evaluate_dev(ctx: "Context", ids: Sequence[str] | None = None, prefix: str = "dev") -> dict[str, float]:
    """Loss and greedy CER/WER on the dev set (or on ``ids``, e.g. the fixed training subset that tells
    a data-limited model from a compute-limited one), each rank on its share, summed over ranks."""
    from asrflow.evaluate.decoding import greedy_decode
    from asrflow.evaluate.scoring import score_corpus

    model, world = ctx.model, ctx.world
    model.eval()
    ids = list(ctx.dev_ids if ids is None else ids)[world.rank::world.size]
    loss_sum, n, char_err, char_ref, word_err, word_ref = 0.0, 0, 0, 0, 0, 0
    for batch in ctx.loader.batches([ids[start:start + 16] for start in range(0, len(ids), 16)]):
        log_probs, out_lens = forward_batch(model, batch, ctx.logmel, None, ctx.device, ctx.amp_dtype)
        out = ctx.eval_loss_fn(log_probs.float(), out_lens, batch.targets.to(ctx.device), batch.target_lens.to(ctx.device))
        loss_sum += float(out.loss) * len(batch.ids)
        n += len(batch.ids)
        hyps = greedy_decode(log_probs.float().cpu(), out_lens.cpu(), ctx.vocab)
        refs = [ctx.index.text(i) for i in batch.ids]
        stats = score_corpus(refs, hyps)
        char_err += stats.chars.errors
        char_ref += stats.chars.ref_len
        word_err += stats.words.errors
        word_ref += stats.words.ref_len
    totals = world.sum(torch.tensor([loss_sum, n, char_err, char_ref, word_err, word_ref], dtype=torch.float64), name="dev")
    model.train()
    return {f"{prefix}_loss": float(totals[0] / max(1, totals[1])), f"{prefix}_cer": float(totals[2] / max(1, totals[3])),
            f"{prefix}_wer": float(totals[4] / max(1, totals[5]))}


@dataclass
class Context:
    params: TrainParams
    world: World
    device: torch.device
    vocab: CharVocab
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp_dtype: torch.dtype | None
    loss_fn: torch.nn.Module
    eval_loss_fn: torch.nn.Module
    logmel: LogMel
    aug: Augmenters
    sampler: BucketBatchSampler
    index: UtteranceIndex      # metadata of the training and dev utterances (no audio)
    loader: BatchLoader        # reads batches of either in its workers
    dev_ids: list[str]
    train_probe_ids: list[str]  # a fixed training subset scored like dev (clean, no augmentation)
    class_weights: dict[str, float] | None
    total_steps: int
    out_dir: Path
    spec: dict[str, Any]
    frontend: Any = None       # asrflow.loudness.Frontend: what prep did to the waveforms; exported with the model
    init_report: Any = None    # asrflow.train.pretrained.InitReport when a fresh run started from init_from
    tracker: Any = None
    progress: Any = None
    archive_stale_checkpoints: bool = False
    weight_average: WeightAverage | None = None  # training.weight_average: the running mean exported as model.pt

    @property
    def batchnorms(self) -> list:
        return batchnorm_modules(self.model)


def checkpoint_state(ctx: Context, state: TrainState) -> dict[str, Any]:
    payload = {"model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
               "scaler": ctx.scaler.state_dict(), "state": state.__dict__.copy(), "spec": ctx.spec,
               "fingerprint": fingerprint(ctx.spec), "params": ctx.params.to_dict(), "vocab": ctx.vocab.to_dict()}
    if ctx.weight_average is not None:
        payload["weight_average"] = ctx.weight_average.state_dict()
    return payload


def restore(ctx: Context, payload: dict[str, Any]) -> TrainState:
    """Weights, optimizer, scaler, the weight mean and the loop's state from a checkpoint's payload."""
    ctx.model.load_state_dict(payload["model"])
    ctx.optimizer.load_state_dict(payload["optimizer"])
    ctx.scaler.load_state_dict(payload["scaler"])
    if ctx.weight_average is not None:
        if "weight_average" not in payload:  # the fingerprint includes the setting, so only a hand-made payload
            raise ValueError("weight_average is enabled but the checkpoint holds no weight mean")
        ctx.weight_average.load_state_dict(payload["weight_average"])
    return TrainState(**payload["state"])


def save(ctx: Context, state: TrainState, is_best: bool) -> None:
    if ctx.world.is_main:
        save_checkpoint(ctx.out_dir / "checkpoints", checkpoint_state(ctx, state), state.global_step,
                        ctx.params.keep_last, is_best=is_best)


def archive_if_stale(ckpt_dir: Path, newest: Path, spec: dict[str, Any]) -> Path | None:
    """The workflow reruns training when its recipe changed: move the old recipe's checkpoints aside
    (kept, not deleted) and start fresh, instead of refusing. Returns the checkpoint to resume, if any."""
    found = torch.load(newest, map_location="cpu", weights_only=False).get("fingerprint")
    if found == fingerprint(spec):
        return newest
    stale = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{found}")
    if stale.exists():
        import shutil
        shutil.rmtree(stale)
    ckpt_dir.rename(stale)
    log.warning("checkpoints in %s belong to another configuration: moved to %s, training from scratch", ckpt_dir, stale)
    return None


def resume(ctx: Context) -> TrainState:
    """Rank 0 reads the newest checkpoint (the folder may exist on its host only) and broadcasts it."""
    state = TrainState()
    payload = None
    if ctx.world.is_main:
        path = latest_checkpoint(ctx.out_dir / "checkpoints")
        if path is not None and ctx.archive_stale_checkpoints:
            path = archive_if_stale(ctx.out_dir / "checkpoints", path, ctx.spec)
        if path is not None:
            payload = load_checkpoint(path, ctx.spec)
            log.info("resuming from %s (epoch %d, step %d)", path, payload["state"]["epoch"], payload["state"]["global_step"])
    if ctx.world.size > 1:
        payload = ctx.world.broadcast_object(payload, name="resume")
    if payload is not None:
        state = restore(ctx, payload)
    elif ctx.params.init_from and ctx.world.is_main:
        start_from_parent(ctx)  # a fresh start only (a resume continues its own weights); fit() broadcasts
    return state


def start_from_parent(ctx: Context) -> None:
    """``init_from``: an earlier asrflow model's encoder (and output layer, where the vocabularies match)
    as the starting point; rank 0's weights are broadcast to the others by fit()."""
    from asrflow.train.pretrained import init_from_asrflow

    report = init_from_asrflow(ctx.model, ctx.params.init_from, ctx.vocab)
    ctx.init_report = report
    log.info("initialized from %s (sha256 %s, parent run %s): %d tensors; %s", report.path, report.sha256[:12],
             report.parent_run_id, report.loaded, report.head_reason)
    if ctx.tracker is not None:
        log_parent(ctx.tracker, report)


def log_parent(tracker, report) -> None:
    """The lineage of a run started from ``init_from``: the parent model's path, digest and MLflow run."""
    tracker.params({"init_from": report.path, "init_from.sha256": report.sha256,
                    "init_from.head_loaded": report.head_loaded, "init_from.parent_run_id": report.parent_run_id or ""})
    tracker.tags({"asrflow.parent_run_id": report.parent_run_id or "", "asrflow.parent_sha256": report.sha256})


def end_of_epoch(ctx: Context, state: TrainState, partial: bool = False) -> bool:
    """BN statistics averaged, dev evaluated, checkpoint written; returns True to keep training.

    ``partial``: a stop criterion fired mid-epoch. The epoch still gets its dev score and checkpoint,
    but keeps its position, so raising the limit and rerunning continues exactly where it stopped.
    """
    if not ctx.params.sync_batchnorm:
        average_batchnorm_statistics(ctx.model, ctx.world)
    dev = evaluate_dev(ctx)
    if ctx.train_probe_ids:
        dev.update(evaluate_dev(ctx, ctx.train_probe_ids, prefix="train_clean"))
    improved = dev["dev_loss"] < state.best_dev_loss
    if improved:
        state.best_dev_loss = dev["dev_loss"]
        state.epochs_without_improvement = 0
    elif not partial:
        state.epochs_without_improvement += 1
    state.history.append({"epoch": state.epoch, "step": state.global_step, "partial": partial,
                          "train_seconds": round(state.train_seconds, 2), **dev})
    if ctx.world.is_main:
        log.info("epoch %d %s: dev loss %.3f CER %.3f WER %.3f", state.epoch, "stopped" if partial else "done",
                 dev["dev_loss"], dev["dev_cer"], dev["dev_wer"])
        if ctx.tracker is not None:
            ctx.tracker.metrics({**dev, "train_seconds": state.train_seconds}, step=state.global_step)
    if not partial:
        state.epoch += 1
        state.batch_in_epoch = 0
    save(ctx, state, is_best=improved)
    if partial:
        return False
    return not stop_after_epoch(ctx, state)


def stop_after_epoch(ctx: Context, state: TrainState) -> bool:
    p = ctx.params
    if p.early_stopping_patience and state.epochs_without_improvement >= p.early_stopping_patience:
        state.stop_reason = f"no dev-loss improvement for {p.early_stopping_patience} epochs"
        return True
    if state.epoch >= p.epochs:
        state.stop_reason = f"{p.epochs} epochs done"
        return True
    return False


def fit(ctx: Context) -> TrainState:
    """Train until a stop criterion; a rerun with raised limits continues from the last checkpoint."""
    state = resume(ctx)
    ctx.world.broadcast_model_and_optimizer(ctx.model, ctx.optimizer)
    state.finished, state.stop_reason = False, ""
    while not (stop_after_epoch(ctx, state) or should_stop(ctx, state)):
        if not train_one_epoch(ctx, state):
            end_of_epoch(ctx, state, partial=state.batch_in_epoch < len(ctx.sampler))
            break
        if not end_of_epoch(ctx, state):
            break
    state.finished = True
    save(ctx, state, is_best=False)
    return state
