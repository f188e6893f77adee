"""Entry point of one training run (what `horovodrun ... python -m asrflow.train.run` starts per rank)."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from asrflow.manifest import read_manifest, write_json
from asrflow.prep.bucketing import BucketBatchSampler, BucketPlan
from asrflow.text import CharVocab
from asrflow.train.data import AudioStore, dialect_class_weights
from asrflow.train.distributed import init_distributed
from asrflow.train.features import GlobalCMVN, LogMel
from asrflow.train.losses import build_ctc_loss
from asrflow.train.models import build_model, count_parameters
from asrflow.train.params import TrainParams
from asrflow.train.precision import make_grad_scaler, resolve_precision
from asrflow.train.trainer import Context, build_augmenters, fit

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
    utts = read_manifest(args.manifest)
    train_store = AudioStore([u for u in utts if u.id in plan.durations], vocab)
    dev = sorted((u for u in utts if u.split == "dev"), key=lambda u: u.id)
    if params.dev_max_utterances:
        dev = dev[: params.dev_max_utterances]
    dev_store = AudioStore(dev, vocab)  # evaluate_dev gives each rank its share
    cmvn = GlobalCMVN.load(args.cmvn)
    torch.manual_seed(params.seed)  # identical initial weights on every rank (rank 0's are broadcast anyway)
    model = build_model(params.model, len(vocab), params.n_mels, cmvn=cmvn).to(device)
    if params.sync_batchnorm:
        model = world.sync_batchnorm(model)
    amp_dtype, use_scaler = resolve_precision(params.precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    optimizer = world.wrap_optimizer(optimizer, model)
    sampler = BucketBatchSampler(plan, world.rank, world.size, params.seed,
                                 oversample_temperature=params.oversample_temperature or None,
                                 bucketed=params.bucketing, sortagrad_epochs=params.sortagrad_epochs)
    weights = None
    if params.class_weight_power:
        weights = dialect_class_weights([u.dialect for u in train_store.utts.values()], params.class_weight_power)
    loss_cfg = dict(params.loss)
    spec = params.fingerprint_spec(vocab.identity(), hashlib.sha256(plan_text.encode()).hexdigest()[:16])
    return Context(
        params=params, world=world, device=device, vocab=vocab, model=model, optimizer=optimizer,
        scaler=make_grad_scaler(use_scaler, device), amp_dtype=amp_dtype,
        loss_fn=build_ctc_loss(loss_cfg.get("kind", "smoothed"), float(loss_cfg.get("smoothing", 0.1))),
        eval_loss_fn=build_ctc_loss("plain"), logmel=LogMel(params.n_mels).to(device),
        aug=build_augmenters(params, args.noise), sampler=sampler, train_store=train_store,
        dev_store=dev_store, dev_ids=dev_store.ids(), class_weights=weights,
        total_steps=params.max_steps or params.epochs * len(sampler), out_dir=args.out_dir, spec=spec)


def export_model(ctx: Context, state, path: Path) -> None:
    """The deployable model: best-by-dev-loss weights, plus everything transcription needs."""
    best = ctx.out_dir / "checkpoints" / "best.pt"
    weights = torch.load(best, map_location="cpu", weights_only=False)["model"] if best.exists() else ctx.model.state_dict()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": weights, "model_config": ctx.params.model, "n_mels": ctx.params.n_mels,
                "vocab": ctx.vocab.to_dict(), "sample_rate": 16000, "params": ctx.params.to_dict(),
                "history": state.history}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = init_distributed()
    setup_logging(world.rank, args.log_dir)
    params = TrainParams.from_config(json.loads(args.params.read_text()))
    ctx = build_context(args, params, world)
    ctx.archive_stale_checkpoints = args.archive_stale_checkpoints
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log.info("world: %d rank(s) over %s, device %s, precision %s, %d parameters, %d batches/epoch/rank",
             world.size, world.backend, ctx.device, ctx.amp_dtype or "fp32", count_parameters(ctx.model), len(ctx.sampler))
    tracker = None
    if world.is_main:
        from asrflow.tracking import StepRun, resolve_tracking_uri

        run_config = json.loads(args.run_config.read_text()) if args.run_config else {}
        tracker = StepRun("train", run_config, args.experiment, resolve_tracking_uri(args.tracking_uri),
                          run_name=f"train[{params.variant}]", extra_tags={"asrflow.variant": params.variant},
                          system_metrics=True).__enter__()
        tracker.params({f"train.{k}": v for k, v in params.to_dict().items()} |
                       {"world_size": world.size, "backend": world.backend, "device": str(ctx.device),
                        "parameters": count_parameters(ctx.model)})
        ctx.tracker = tracker
        if sys.stderr.isatty():
            from tqdm import tqdm
            ctx.progress = tqdm(total=ctx.total_steps, desc=f"train[{params.variant}]")
    try:
        state = fit(ctx)
    except BaseException as exc:
        if tracker is not None:
            tracker.__exit__(type(exc), exc, None)
        raise
    if world.is_main:
        model_path = args.out_dir / "model.pt"
        export_model(ctx, state, model_path)
        summary = {"variant": params.variant, "stop_reason": state.stop_reason, "global_step": state.global_step,
                   "epochs": state.epoch, "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds,
                   "best_dev_loss": state.best_dev_loss, "history": state.history, "world_size": world.size,
                   "precision": str(ctx.amp_dtype or "fp32"), "parameters": count_parameters(ctx.model)}
        write_json(args.out_dir / "train_summary.json", summary)
        tracker.metrics({"skipped_steps_total": state.skipped_steps, "best_dev_loss": state.best_dev_loss})
        tracker.artifact(args.out_dir / "train_summary.json")
        log_pytorch_model(tracker, model_path)
        tracker.__exit__(None, None, None)
        log.info("done: %s", state.stop_reason)
    world.shutdown()
    return 0


def log_pytorch_model(tracker, model_path: Path) -> None:
    """Log the trained network with mlflow.pytorch (a loadable torch model) next to the raw checkpoint."""
    import mlflow.pytorch

    from asrflow.tracking import store_lock
    from asrflow.transcribe import load_model

    model = load_model(model_path)
    with store_lock(tracker.uri):
        # pickle: the Recognizer takes (waves, lengths), which the traced pt2 format cannot infer from one example
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 pip_requirements=["torch==2.11.0", "torchaudio==2.11.0", "asrflow"])
    tracker.artifact(model_path, "checkpoint")


if __name__ == "__main__":
    sys.exit(main())
