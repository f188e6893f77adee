"""Entry point of one training run (what `horovodrun ... python -m asrflow.train.run` starts per rank)."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from asrflow.manifest import iter_manifest, write_json
from asrflow.audio import SAMPLE_RATE
from asrflow.text import CharVocab
from asrflow.train.data import BatchLoader, UtteranceIndex, dialect_class_weights
from asrflow.train.distributed import init_distributed
from asrflow.train.features import GlobalCMVN, LogMel
from asrflow.train.losses import build_ctc_loss
from asrflow.train.models import build_model, count_parameters
from asrflow.train.params import TrainParams
from asrflow.train.precision import make_grad_scaler, resolve_precision
from asrflow.train.sampler import BucketBatchSampler, BucketPlan
from asrflow.train.trainer import Context, TrainState, build_augmenters, fit
from asrflow.train.weight_average import WeightAverage

log = logging.getLogger("asrflow.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", required=True, type=Path, help="prepared (truncated) manifest")
    ap.add_argument("--plan", required=True, type=Path, help="bucketing plan (buckets.json)")
    ap.add_argument("--vocab", required=True, type=Path)
    ap.add_argument("--cmvn", required=True, type=Path)
    ap.add_argument("--noise", type=Path, default=None, help="noise manifest (train environments are used)")
    ap.add_argument("--params", required=True, type=Path,
                    help="JSON file of training params (the variant's resolved training section)")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--experiment", default="asrflow")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--run-config", type=Path, default=None,
                    help="JSON file of the resolved workflow config, recorded as MLflow params")
    ap.add_argument("--log-dir", type=Path, default=None, help="per-rank log files go here")
    ap.add_argument("--frontend", type=Path, default=None,
                    help="JSON of the waveform front end prep applied (asrflow.loudness.Frontend: sample rate, "
                         "loudness target and ceiling); exported with the model so inference applies the same")
    ap.add_argument("--encoder-cache", type=Path, default=None,
                    help="folder of cached frozen-encoder outputs (rule encoder_cache), for encoder_cache: true")
    ap.add_argument("--phones", type=Path, default=None,
                    help="phone lexicon (rule phone_lexicon, asrflow.phones) for a model with phone_ctc_layer")
    ap.add_argument("--archive-stale-checkpoints", action="store_true",
                    help="move checkpoints of another configuration aside and start fresh (the workflow's "
                         "rerun after a recipe change) instead of refusing them")
    return ap.parse_args(argv)


def setup_logging(rank: int, log_dir: Path | None) -> None:
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_dir / f"rank{rank}.log", mode="a"))
    logging.basicConfig(level=logging.INFO, handlers=handlers or [logging.NullHandler()], force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_context(args: argparse.Namespace, params: TrainParams, world) -> Context:
    torch.set_num_threads(max(1, params.threads_per_rank))
    device = pick_device(world.local_rank)
    vocab = CharVocab.load(args.vocab)
    plan_text = args.plan.read_text()
    plan = BucketPlan.from_dict(json.loads(plan_text))
    index, dev_ids = load_index(args.manifest, args.plan, params, plan)
    cmvn = GlobalCMVN.load(args.cmvn)
    phones = open_phone_lexicon(args, params)
    check_decoder_loss(params)
    torch.manual_seed(params.seed)  # identical initial weights on every rank (rank 0's are broadcast anyway)
    model = build_model(params.model, len(vocab), params.n_mels, cmvn=cmvn).to(device)
    attach_adversary(model, params, index, plan, device)
    loader = BatchLoader(index, vocab, workers=params.loader_workers,
                         prefetch_factor=params.prefetch_factor, persistent_workers=params.persistent_workers,
                         pin_memory=device.type == "cuda", encoded=open_encoder_cache(args, params, model, index),
                         phones=phones)
    if params.sync_batchnorm:
        model = world.sync_batchnorm(model)
    amp_dtype, use_scaler = resolve_precision(params.precision, device)
    from asrflow.train.pretrained import apply_freeze_schedule, param_groups

    apply_freeze_schedule(model, 0)  # frozen parts never get a gradient; resume re-applies at its step
    # one group per LR scale (a pretrained encoder's is lower); prepare_step sets lr x lr_scale per group
    optimizer = torch.optim.AdamW(param_groups(model), lr=params.lr, weight_decay=params.weight_decay)
    optimizer = world.wrap_optimizer(optimizer, model)
    sampler = BucketBatchSampler(plan, world.rank, world.size, params.seed,
                                 oversample_temperature=params.oversample_temperature or None,
                                 bucketed=params.bucketing, sortagrad_epochs=params.sortagrad_epochs)
    weights = None
    if params.class_weight_power:
        weights = dialect_class_weights([index[u].dialect for u in plan.durations], params.class_weight_power)
    loss_cfg = dict(params.loss)
    spec = params.fingerprint_spec(vocab.identity(), hashlib.sha256(plan_text.encode()).hexdigest()[:16])
    from asrflow.loudness import Frontend

    frontend_file = getattr(args, "frontend", None)  # the benchmark's workers pass none: prep's defaults
    frontend = Frontend.from_dict(json.loads(frontend_file.read_text()) if frontend_file else None)
    if frontend.sample_rate != SAMPLE_RATE:
        raise ValueError(f"{args.frontend}: sample rate {frontend.sample_rate}, the trainer needs {SAMPLE_RATE}")
    return Context(
        frontend=frontend,
        params=params, world=world, device=device, vocab=vocab, model=model, optimizer=optimizer,
        scaler=make_grad_scaler(use_scaler, device), amp_dtype=amp_dtype,
        loss_fn=build_ctc_loss(loss_cfg.get("kind", "smoothed"), float(loss_cfg.get("smoothing", 0.1))),
        eval_loss_fn=build_ctc_loss("plain"), logmel=LogMel(params.n_mels).to(device),
        aug=build_augmenters(params, args.noise, frontend), sampler=sampler, index=index, loader=loader,
        dev_ids=sorted(dev_ids), train_probe_ids=train_probe_ids(plan, params), class_weights=weights,
        total_steps=params.max_steps or params.epochs * len(sampler), out_dir=args.out_dir, spec=spec,
        weight_average=WeightAverage.from_params(params.weight_average))


def load_index(manifest: Path, plan_path: Path, params: TrainParams,
               plan: BucketPlan | None = None) -> tuple[UtteranceIndex, set[str]]:
    """The metadata of the plan's training utterances and of the dev set (``dev_max_utterances`` of it),
    in one streaming pass over the manifest: no list of every utterance, and no audio, which the loader
    workers read. Returns (index, dev ids)."""
    plan = plan or BucketPlan.from_dict(json.loads(plan_path.read_text()))
    index, dev = UtteranceIndex(()), []
    for u in iter_manifest(manifest):
        if u.id in plan.durations:
            index.add(u)
        elif u.split == "dev":
            dev.append(u)
    dev = sorted(dev, key=lambda u: u.id)
    if params.dev_max_utterances:
        dev = dev[: params.dev_max_utterances]
    for u in dev:
        index.add(u)
    dev_ids = {u.id for u in dev}
    if len(index) < len(plan.durations) + len(dev_ids):
        missing = set(plan.durations) - set(index.meta)
        raise ValueError(f"{plan_path}: {len(missing)} planned utterance(s) not in {manifest}, "
                         f"e.g. {sorted(missing)[:3]}: rebuild the plan (rule bucketing)")
    return index, dev_ids


def attach_adversary(model, params: TrainParams, index, plan: BucketPlan, device: torch.device) -> None:
    """training.voice_adversary: the voice classifier on the encoder's output (asrflow.train.adversary), its
    classes the training utterances' voices (or speakers), sorted so that every rank numbers them alike."""
    from asrflow.train.adversary import AdversarySettings, attach_voice_adversary, utterance_label

    settings = AdversarySettings.from_dict(params.voice_adversary)
    if not settings.enabled:
        return
    if params.encoder_cache:
        raise ValueError("voice_adversary needs the encoder to run (and train); encoder_cache skips it: turn one off")
    classes = sorted({utterance_label(index[u].voice, index[u].speaker, settings.label) for u in plan.durations})
    attach_voice_adversary(model, settings, classes).to(device)
    log.info("voice adversary on the encoder's output: %d %ss, weight %.2f, its confusion ramped in over %d steps",
             len(classes), settings.label, settings.weight, settings.ramp_steps)


def check_decoder_loss(params: TrainParams) -> None:
    """A Whisper decoder without a loss weight would never train; a weight without one would do nothing."""
    from asrflow.train.trainer import auxiliary_ctc_weights

    from asrflow.train.pretrained.whisper_decoder import decoder_mode

    weight = auxiliary_ctc_weights(params.loss)[2]
    mode = decoder_mode(params.model)
    if mode != "none" and weight <= 0:
        raise ValueError(f"model.decoder is {mode} but loss.decoder_weight is 0: the decoder would do nothing; "
                         "set the weight (e.g. 0.3) or remove decoder")
    if weight > 0 and mode == "none":
        raise ValueError(f"loss.decoder_weight is {weight} but the model has no decoder (whisper_encoder with "
                         "decoder: frozen or trained)")
    if mode != "none":
        log.info("auxiliary Whisper decoder (%s): loss = %.2f x CTC + %.2f x decoder cross-entropy", mode, 1 - weight,
                 weight)


def open_phone_lexicon(args: argparse.Namespace, params: TrainParams):
    """The phone lexicon of a run whose model has an auxiliary phone CTC head, else None. Sets the
    model config's ``phone_vocab_size`` from it, so the exported model rebuilds with the same head."""
    from asrflow.train.trainer import auxiliary_ctc_weights

    _, phone_weight, _ = auxiliary_ctc_weights(params.loss)
    layer = int(params.model.get("phone_ctc_layer", 0) or 0)
    if layer and phone_weight <= 0:
        raise ValueError(f"model.phone_ctc_layer is {layer} but loss.phone_ctc_weight is 0: the phone head would "
                         f"never be trained; set the weight (e.g. 0.2) or remove the layer")
    if not layer:
        if phone_weight > 0:  # e.g. a pretrained-encoder variant inheriting the base recipe's loss
            log.info("loss.phone_ctc_weight %.2f has no effect: this model has no phone CTC head", phone_weight)
        return None
    path = getattr(args, "phones", None)
    if path is None:
        raise ValueError("model.phone_ctc_layer is set, but no --phones lexicon was given (the workflow's rule "
                         "phone_lexicon writes results/prep/phones.json)")
    from asrflow.phones import PhoneLexicon

    lexicon = PhoneLexicon.load(path)
    params.model = {**params.model, "phone_vocab_size": len(lexicon)}
    log.info("auxiliary phone CTC on layer %d, weight %.2f: %d phones, %d words (%s)", layer, phone_weight,
             len(lexicon) - 1, len(lexicon.words), path)
    return lexicon


def open_encoder_cache(args: argparse.Namespace, params: TrainParams, model: torch.nn.Module, index: UtteranceIndex):
    """The frozen-encoder cache a run with ``encoder_cache: true`` trains from, checked against the model
    and the utterances; None for every other run."""
    if not params.encoder_cache:
        return None
    from asrflow.train.pretrained.encoder_cache import EncoderCache, EncoderCacheError, check_recipe

    check_recipe(params)
    folder = getattr(args, "encoder_cache", None)
    if folder is None:
        raise EncoderCacheError("encoder_cache: true, but no --encoder-cache folder was given (the workflow's rule "
                                "encoder_cache writes results/train/<variant>/encoder_cache)")
    cache = EncoderCache(folder)
    cache.check(model.model_config, index.ids())
    log.info("training the head on cached encoder outputs from %s (%d utterances, %d frames x %d)", folder,
             len(cache.rows), cache.n_frames, cache.d_model)
    return cache


def train_probe_ids(plan: BucketPlan, params: TrainParams) -> list[str]:
    """``train_cer_utterances`` training utterances, spread evenly over the sorted ids (fixed per plan)."""
    ids = sorted(plan.durations)
    n = min(len(ids), params.train_cer_utterances)
    return [ids[round(i * len(ids) / n)] for i in range(n)] if n else []


def export_model(ctx: Context, state, path: Path) -> None:
    """The deployable model: the run's weight mean (training.weight_average) or else the best-by-dev-loss
    weights, plus everything transcription needs."""
    best = ctx.out_dir / "checkpoints" / "best.pt"
    if ctx.weight_average is not None:
        weights = ctx.weight_average.averaged_state_dict(ctx.model.state_dict())
        log.info("model.pt: the mean of the weights after %d steps (from step %d, every %d)", ctx.weight_average.count,
                 ctx.weight_average.start_step, ctx.weight_average.every)
    elif best.exists():
        weights = torch.load(best, map_location="cpu", weights_only=False)["model"]
    else:
        weights = ctx.model.state_dict()
    tmp = path.with_name(f".{path.name}.tmp")
    from asrflow.train.pretrained import exportable_model_config, exportable_weights

    config = exportable_model_config(ctx.model, ctx.params.model)
    torch.save({"model": exportable_weights(config, weights), "model_config": config,
                "n_mels": ctx.params.n_mels, "mlflow_run_id": ctx.tracker.run.info.run_id if getattr(ctx.tracker, "run", None) is not None else None,
                "vocab": ctx.vocab.to_dict(), "sample_rate": SAMPLE_RATE, "params": ctx.params.to_dict(),
                "frontend": ctx.frontend.to_dict(), "history": state.history}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = init_distributed()
    setup_logging(world.rank, args.log_dir)
    params = TrainParams.from_config(json.loads(args.params.read_text()))
    ctx = build_context(args, params, world)
    ctx.archive_stale_checkpoints = args.archive_stale_checkpoints
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log.info("world: %d rank(s) over %s, device %s, precision %s, %d parameters, %d batches/epoch/rank, "
             "%d loader worker(s)", world.size, world.backend, ctx.device, ctx.amp_dtype or "fp32",
             count_parameters(ctx.model), len(ctx.sampler), params.loader_workers)
    # rank 0 records the run; `with` closes it (FAILED) whatever raises, the export included
    with (tracked_run(args, ctx) if world.is_main else contextlib.nullcontext()) as tracker:
        ctx.tracker = tracker
        if tracker is not None and sys.stderr.isatty():
            from tqdm import tqdm
            ctx.progress = tqdm(total=ctx.total_steps, desc=f"train[{params.variant}]")
        state = fit(ctx)
        if world.is_main:
            finish(args, ctx, state, tracker)
    world.shutdown()
    return 0


def tracked_run(args: argparse.Namespace, ctx: Context, extra_tags: dict[str, str] | None = None):
    """The training run's MLflow run (a StepRun), with the recipe and the world as params."""
    from asrflow.tracking import StepRun, resolve_tracking_uri

    params = ctx.params
    run_config = json.loads(args.run_config.read_text()) if args.run_config else {}
    run = StepRun("train", run_config, args.experiment, resolve_tracking_uri(args.tracking_uri),
                  run_name=f"train[{params.variant}]", extra_tags={"asrflow.variant": params.variant, **(extra_tags or {})},
                  system_metrics=True)

    @contextlib.contextmanager
    def opened():
        with run as tracker:
            tracker.params({f"train.{k}": v for k, v in params.to_dict().items()} |
                           {"world_size": ctx.world.size, "backend": ctx.world.backend, "device": str(ctx.device),
                            "parameters": count_parameters(ctx.model)})
            log_inputs(tracker, args)
            yield tracker
    return opened()


def log_inputs(tracker, args: argparse.Namespace) -> None:
    """What the model was trained from, as MLflow datasets with digests: its lineage, readable from MLflow."""
    tracker.dataset(args.manifest, "train_manifest", "training")
    for name, path in (("bucket_plan", args.plan), ("vocab", args.vocab), ("cmvn", args.cmvn), ("noise", args.noise),
                       ("phone_lexicon", getattr(args, "phones", None))):
        if path is not None:
            tracker.file_input(path, name, "training")


def finish(args: argparse.Namespace, ctx: Context, state: TrainState, tracker, extra: dict[str, Any] | None = None) -> None:
    """Rank 0, after training: the exported model, ``train_summary.json``, and their MLflow records.
    The one end of every training mode (normal and elastic)."""
    params = ctx.params
    model_path = args.out_dir / "model.pt"
    export_model(ctx, state, model_path)
    summary = {"variant": params.variant, "stop_reason": state.stop_reason, "global_step": state.global_step,
               "epochs": state.epoch, "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds,
               "best_dev_loss": state.best_dev_loss, "history": state.history, "world_size": ctx.world.size,
               "precision": str(ctx.amp_dtype or "fp32"), "parameters": count_parameters(ctx.model),
               "loader_workers": params.loader_workers, **(extra or {})}
    if ctx.weight_average is not None:  # what model.pt holds: the mean of this many steps' weights
        wa = ctx.weight_average
        summary["weight_average"] = {"steps_averaged": wa.count, "start_step": wa.start_step, "every": wa.every}
    write_json(args.out_dir / "train_summary.json", summary)
    if tracker is not None:
        tracker.metrics({"skipped_steps_total": state.skipped_steps, "best_dev_loss": state.best_dev_loss})
        tracker.artifact(args.out_dir / "train_summary.json")
        log_pytorch_model(tracker, model_path)
    log.info("done: %s", state.stop_reason)


def without_parametrizations(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parametrization baked into a plain tensor, in place: pickling refuses
    parametrized modules (wav2vec2's weight-normed positional convolution), and the network it computes is
    the same (a copy loaded for logging, never trained further)."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def log_pytorch_model(tracker, model_path: Path) -> None:
    """Log the trained network with mlflow.pytorch (a loadable torch model) next to the raw checkpoint,
    through the run's journal: a tracking server that is down at the end does not fail the training."""
    from asrflow.transcribe import load_model

    model = without_parametrizations(load_model(model_path))
    # pickle: the Recognizer takes (waves, lengths), which the traced pt2 format cannot infer from one example
    tracker.pytorch_model(model, name="model", serialization_format="pickle",
                          pip_requirements=["torch==2.11.0", "torchaudio==2.11.0", "asrflow"])
    tracker.artifact(model_path, "checkpoint")


if __name__ == "__main__":
    sys.exit(main())
