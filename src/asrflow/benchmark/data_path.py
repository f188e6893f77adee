"""The training data path, measured: memory against corpus size, loader wait, start-up on a
LibriSpeech-size manifest, and our sampler against lhotse's ``DynamicBucketingSampler``.

    asrflow-data-benchmark --manifest results/prep/truncated.jsonl --plan results/prep/buckets.json \\
        --vocab results/prep/vocab.json --cmvn results/prep/cmvn.json --noise results/noise/manifest.jsonl \\
        --params params.json --out results/benchmark/data_path.json --md results/benchmark/data_path.md

Every training measurement runs the real trainer (``build_context`` + ``run_batches``) in a fresh
process, and memory is the peak, sampled every 100 ms, of the rank's RSS plus its loader workers'
unique memory (USS: what each holds beyond the pages it shares with the rank).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil

from asrflow.audio import FRAMES_PER_SECOND
from asrflow.manifest import read_records, write_json
from asrflow.train.sampler import BucketBatchSampler, BucketPlan, frames, padding_ratio

log = logging.getLogger("asrflow.benchmark.data_path")
MB = 1024 * 1024
LIBRISPEECH_UTTERANCES = 281_241  # train-clean-100 + train-clean-360 + train-other-500


class TreeMemory:
    """Peak memory of this process (RSS) plus its children's (loader workers') unique memory (USS),
    sampled in a thread. Forked workers share the rank's pages until they write them; USS counts only
    what a worker holds alone, so shared pages are not counted twice."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self.peak_self = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        own = me.memory_info().rss
        total = own
        for child in me.children(recursive=True):
            try:
                total += child.memory_full_info().uss
            except psutil.Error:
                pass
        self.peak, self.peak_self = max(self.peak, total), max(self.peak_self, own)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "TreeMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- manifests ----------------------------------------------------------------------------------------
def scaled_corpus(manifest: Path, plan: BucketPlan, factor: int, out_dir: Path) -> tuple[Path, Path]:
    """The corpus ``factor`` times over: more utterance ids (``<id>~k``), the same audio files; dev as is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(manifest)
    base = manifest.resolve().parent
    lines, durations, dialects = [], {}, {}
    for r in records:
        audio = r["audio"] if os.path.isabs(r["audio"]) else str(base / r["audio"])
        copies = range(factor) if r["id"] in plan.durations else [0] if r["split"] == "dev" else []
        for k in copies:
            uid = r["id"] if k == 0 else f"{r['id']}~{k}"
            lines.append(json.dumps({**r, "id": uid, "audio": audio}))
            if r["id"] in plan.durations:
                durations[uid], dialects[uid] = plan.durations[r["id"]], plan.dialects.get(r["id"], "")
    path = out_dir / f"manifest.x{factor}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    scaled = BucketPlan(durations=durations, edges=list(plan.edges), frame_budget=plan.frame_budget,
                        max_batch_size=plan.max_batch_size, dialects=dialects)
    plan_path = out_dir / f"buckets.x{factor}.json"
    write_json(plan_path, scaled.to_dict())
    return path, plan_path


def librispeech_like_durations(n: int, seed: int = 0) -> list[float]:
    """Durations shaped like LibriSpeech's 960 h training set: most 10-17 s (mean ~12.3 s), a tail
    of short ones. The reader never opens these files for their length: prep measured it."""
    rng = random.Random(seed)
    return [round(rng.uniform(10.0, 16.8) if rng.random() < 0.85 else rng.uniform(1.0, 10.0), 2) for _ in range(n)]


def librispeech_size_corpus(manifest: Path, plan: BucketPlan, out_dir: Path, n: int = LIBRISPEECH_UTTERANCES,
                            seed: int = 0) -> tuple[Path, Path]:
    """A synthetic manifest of ``n`` training utterances with LibriSpeech-like durations, whose audio
    repeats the prepared training files, and its plan (same bucket count, frame budget and batch cap)."""
    from asrflow.prep.bucketing import build_plan

    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(manifest)
    base = manifest.resolve().parent
    train = [r for r in records if r["id"] in plan.durations]
    dev = [r for r in records if r["split"] == "dev"][:8]
    durs = librispeech_like_durations(n, seed)
    lines, durations, dialects = [], {}, {}
    for i, d in enumerate(durs):
        r = train[i % len(train)]
        uid = f"ls-{i:06d}"
        audio = r["audio"] if os.path.isabs(r["audio"]) else str(base / r["audio"])
        lines.append(json.dumps({**r, "id": uid, "audio": audio, "duration": d}))
        durations[uid], dialects[uid] = d, r.get("dialect", "")
    for r in dev:
        audio = r["audio"] if os.path.isabs(r["audio"]) else str(base / r["audio"])
        lines.append(json.dumps({**r, "audio": audio}))
    path = out_dir / "manifest.librispeech-size.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # LibriSpeech utterances are ~12 s: the budget must hold at least a few of the longest
    big = build_plan(durations, dialects, num_buckets=len(plan.edges) + 1,
                     frame_budget=max(plan.frame_budget, 4 * frames(max(durs))), max_batch_size=plan.max_batch_size)
    plan_path = out_dir / "buckets.librispeech-size.json"
    write_json(plan_path, big.to_dict())
    return path, plan_path


# -- probes (one fresh process each) -----------------------------------------------------------------
def probe_main(argv: list[str]) -> int:
    """``python -m asrflow.benchmark.data_path probe OUT.json STEPS <asrflow.train.run arguments>``:
    build the trainer's context, pull the first batch (start-up), run STEPS training steps, report."""
    out, steps, rest = Path(argv[0]), int(argv[1]), argv[2:]
    t_start = time.perf_counter()
    from asrflow.train.distributed import init_distributed
    from asrflow.train.params import TrainParams
    from asrflow.train.run import build_context, parse_args
    from asrflow.train.trainer import TrainState, run_batches

    with TreeMemory() as mem:
        args = parse_args(rest)
        world = init_distributed()
        params = TrainParams.from_config(json.loads(args.params.read_text()))
        ctx = build_context(args, params, world)
        ctx.sampler.set_epoch(1)  # past SortaGrad: a shuffled epoch, as most of training
        t_plan = time.perf_counter()
        batches = list(ctx.sampler)
        plan_s = time.perf_counter() - t_plan
        next(iter(ctx.loader.batches(batches[:1])))
        first_batch_s = time.perf_counter() - t_start
        state = TrainState(epoch=1)
        stepped = {"wait": 0.0, "step": 0.0, "n": 0, "audio": 0.0}

        def record(ctx_, state_, r) -> None:
            stepped["wait"] += r.loader_wait_seconds
            stepped["step"] += r.step_seconds
            stepped["audio"] += r.batch.audio_seconds
            stepped["n"] += 1

        if steps:
            run_batches(ctx, state, batches[:steps], hooks=[record])
    report = {"rank": world.rank, "world_size": world.size, "utterances": len(ctx.index),
              "batches_per_epoch_per_rank": len(batches), "plan_epoch_s": plan_s,
              "start_to_first_batch_s": first_batch_s, "peak_rss_tree_mb": mem.peak / MB,
              "peak_rss_rank_mb": mem.peak_self / MB, "steps": stepped["n"],
              "loader_wait_share": stepped["wait"] / stepped["step"] if stepped["step"] else None,
              "step_s_mean": stepped["step"] / stepped["n"] if stepped["n"] else None,
              "loader_workers": params.loader_workers}
    world.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.rank{report['rank']}").write_text(json.dumps(report))
    return 0


def run_probe(train_args: list[str], steps: int, out: Path, ranks: int = 1, env: dict | None = None,
              timeout: float = 900) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "asrflow.benchmark.data_path", "probe", str(out), str(steps), *train_args]
    if ranks > 1:
        horovodrun = str(Path(sys.executable).with_name("horovodrun"))
        cmd = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]


def reader_throughput(manifest: Path, plan: BucketPlan, vocab_path: Path, batches: int = 40, seed: int = 0) -> dict:
    """Decoded audio-seconds per second of one reader (what one loader worker delivers)."""
    from asrflow.manifest import read_manifest
    from asrflow.text import vocab_from_dict
    from asrflow.train.data import BatchReader, UtteranceIndex

    vocab = vocab_from_dict(json.loads(Path(vocab_path).read_text()))
    index = UtteranceIndex(u for u in read_manifest(manifest) if u.id in plan.durations)
    reader = BatchReader(vocab, index)
    chosen = BucketBatchSampler(plan, 0, 1, seed).global_batches(1)[:batches]
    t0 = time.perf_counter()
    audio = sum(reader[b].audio_seconds for b in chosen)
    wall = time.perf_counter() - t0
    return {"batches": len(chosen), "audio_s": audio, "wall_s": wall, "audio_s_per_s": audio / wall}


# -- against lhotse ------------------------------------------------------------------------------------
def lhotse_comparison(plan: BucketPlan, world_size: int = 2, seed: int = 0) -> dict[str, Any]:
    """Both samplers on the same utterances and budget: padding, batches per epoch per rank, memory.

    lhotse's budget is ``max_duration`` seconds of real audio per batch; ours is padded frames, so
    lhotse gets the same number of seconds (frame budget / frames per second) and the same bucket count.
    Memory is tracemalloc's peak while building the sampler and walking one epoch.
    """
    from lhotse import CutSet, MonoCut, Recording
    from lhotse.audio import AudioSource
    from lhotse.dataset.sampling import DynamicBucketingSampler

    durs = plan.durations
    out: dict[str, Any] = {"utterances": len(durs), "world_size": world_size}

    tracemalloc.start()
    t0 = time.perf_counter()
    ours = [BucketBatchSampler(plan, r, world_size, seed, sortagrad_epochs=0) for r in range(world_size)]
    for s in ours:
        s.set_epoch(1)
    ours_batches = [list(s) for s in ours]
    ours_s = time.perf_counter() - t0
    ours_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    flat = [b for rank in ours_batches for b in rank]
    out["asrflow"] = {"padding_ratio": padding_ratio([[durs[u] for u in b] for b in flat]),
                      "batches_per_rank": [len(b) for b in ours_batches], "seconds": ours_s,
                      "peak_traced_mb": ours_peak / MB}

    def cut(uid: str, d: float) -> MonoCut:
        n = int(round(d * 16000))
        rec = Recording(id=uid, sources=[AudioSource(type="file", channels=[0], source=f"/nonexistent/{uid}.wav")],
                        sampling_rate=16000, num_samples=n, duration=n / 16000)
        return MonoCut(id=uid, start=0.0, duration=n / 16000, channel=0, recording=rec)

    # lhotse's own large-corpus setup: a lazily read JSONL cut manifest (written outside the measurement)
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="asrflow-lhotse-")
    cuts_path = Path(tmp.name) / "cuts.jsonl.gz"
    CutSet.from_cuts(cut(u, d) for u, d in sorted(durs.items())).to_jsonl(cuts_path)
    tracemalloc.start()
    t0 = time.perf_counter()
    lhotse_batches = []
    for r in range(world_size):
        cuts = CutSet.from_jsonl_lazy(cuts_path)
        sampler = DynamicBucketingSampler(cuts, max_duration=plan.frame_budget / FRAMES_PER_SECOND,
                                          max_cuts=plan.max_batch_size, num_buckets=len(plan.edges) + 1,
                                          shuffle=True, drop_last=False, seed=seed, rank=r, world_size=world_size,
                                          buffer_size=min(20000, len(durs)))
        sampler.set_epoch(1)
        lhotse_batches.append([[c.id for c in b] for b in sampler])
    lhotse_s = time.perf_counter() - t0
    lhotse_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tmp.cleanup()
    flat = [b for rank in lhotse_batches for b in rank]
    seen = sum(len(b) for b in flat)
    out["lhotse"] = {"padding_ratio": padding_ratio([[durs[u] for u in b] for b in flat]),
                     "batches_per_rank": [len(b) for b in lhotse_batches], "seconds": lhotse_s,
                     "peak_traced_mb": lhotse_peak / MB, "utterances_per_epoch": seen,
                     "max_padded_frames": max(len(b) * max(frames(durs[u]) for u in b) for b in flat)}
    out["asrflow"]["max_padded_frames"] = max(len(b) * max(frames(durs[u]) for u in b)
                                              for rank in ours_batches for b in rank)
    out["asrflow"]["utterances_per_epoch"] = sum(len(b) for rank in ours_batches for b in rank)
    return out


# -- the whole measurement -----------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict[str, Any]:
    plan = BucketPlan.from_dict(json.loads(args.plan.read_text()))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    params = json.loads(args.params.read_text())
    for k in ("np", "hosts"):
        params.pop(k, None)
    params.update({"checkpoint_every_steps": 0, "log_every": 1_000_000, "max_steps": 0, "time_budget_minutes": 0.0,
                   "dev_max_utterances": 4, "augment_after_steps": 0})
    params_path = work / "params.json"
    params_path.write_text(json.dumps(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def train_args(manifest: Path, plan_path: Path) -> list[str]:
        return ["--manifest", str(manifest), "--plan", str(plan_path), "--vocab", str(args.vocab), "--cmvn",
                str(args.cmvn), "--noise", str(args.noise), "--params", str(params_path), "--out-dir", str(work / "out"),
                *(["--phones", str(args.phones)] if args.phones else [])]

    report: dict[str, Any] = {"steps": args.steps}
    memory = {}
    for factor in (1, args.scale):
        manifest, plan_path = scaled_corpus(args.manifest, plan, factor, work / "scaled")
        log.info("memory: %dx corpus, %d steps", factor, args.steps)
        memory[f"x{factor}"] = run_probe(train_args(manifest, plan_path), args.steps, work / f"probe-x{factor}.json",
                                         env=env)[0]
    memory["ratio"] = memory[f"x{args.scale}"]["peak_rss_tree_mb"] / memory["x1"]["peak_rss_tree_mb"]
    report["memory"] = memory
    report["reader"] = reader_throughput(args.manifest, plan, args.vocab)
    if args.startup_utterances:
        manifest, plan_path = librispeech_size_corpus(args.manifest, plan, work / "librispeech", args.startup_utterances)
        big = BucketPlan.from_dict(json.loads(plan_path.read_text()))
        log.info("start-up: %d utterances, %d ranks", args.startup_utterances, args.ranks)
        ranks = run_probe(train_args(manifest, plan_path), 0, work / "probe-startup.json", ranks=args.ranks, env=env)
        report["startup"] = {"utterances": args.startup_utterances, "ranks": ranks,
                             "plan_padding_ratio": padding_ratio([[big.durations[u] for u in b] for b in
                                                                  BucketBatchSampler(big, 0, 1, 0).global_batches(1)]),
                             "frame_budget": big.frame_budget}
        report["lhotse"] = {"default": lhotse_comparison(plan, args.ranks)}
        if args.lhotse_large:  # minutes: lhotse walks the whole lazy cut stream once per rank, in Python
            report["lhotse"]["librispeech_size"] = lhotse_comparison(big, args.ranks)
    else:
        report["lhotse"] = {"default": lhotse_comparison(plan, args.ranks)}
    return report


def fmt(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def render_markdown(r: dict[str, Any]) -> str:
    m = r["memory"]
    scale = next(k for k in m if k.startswith("x") and k != "x1")
    lines = ["# The training data path", "",
             f"Real training steps ({r['steps']} per run, 1 rank, {m['x1']['loader_workers']} loader worker); "
             "memory = peak RSS of the rank plus its loader workers' unique memory (USS).", "",
             "| corpus | utterances | peak memory, rank + workers (MB) | rank alone, RSS (MB) | loader wait / step time | mean step (s) |",
             "|---|---|---|---|---|---|"]
    for k in ("x1", scale):
        p = m[k]
        lines.append(f"| {k[1:]}× | {p['utterances']} | {fmt(p['peak_rss_tree_mb'], 0)} | {fmt(p['peak_rss_rank_mb'], 0)} | "
                     f"{fmt(100 * p['loader_wait_share'] if p['loader_wait_share'] is not None else None)}% | {fmt(p['step_s_mean'], 3)} |")
    lines += ["", f"Memory at {scale[1:]}× the corpus: **{m['ratio']:.2f}×** the 1× figure.", "",
              f"One reader (one loader worker's work): **{r['reader']['audio_s_per_s']:.0f} audio-s/s** decoded and "
              f"collated ({r['reader']['batches']} batches, {r['reader']['audio_s']:.0f} s of audio). A GPU that trains at "
              "X audio-s/s needs about X / this many workers per rank.", ""]
    if "startup" in r:
        s = r["startup"]
        lines += [f"## Start-up on a LibriSpeech-size manifest ({s['utterances']} utterances, frame budget "
                  f"{s['frame_budget']})", "",
                  "| rank | start to first batch (s) | planning one epoch (s) | batches/epoch/rank | peak memory, rank + workers (MB) |",
                  "|---|---|---|---|---|"]
        for p in s["ranks"]:
            lines.append(f"| {p['rank']} | {fmt(p['start_to_first_batch_s'])} | {fmt(p['plan_epoch_s'], 2)} | "
                         f"{p['batches_per_epoch_per_rank']} | {fmt(p['peak_rss_tree_mb'], 0)} |")
        lines += ["", f"Padding of the plan: {100 * s['plan_padding_ratio']:.2f}%.", ""]
    lines += ["## Our sampler against lhotse's DynamicBucketingSampler (same utterances and budget)", "",
              "| manifest | sampler | padding | batches/epoch per rank | utterances/epoch | planning every rank's epoch, under tracemalloc (s) | peak traced memory (MB) |",
              "|---|---|---|---|---|---|---|"]
    for name, c in r["lhotse"].items():
        for who in ("asrflow", "lhotse"):
            x = c[who]
            lines.append(f"| {name} ({c['utterances']} utts) | {who} | {100 * x['padding_ratio']:.2f}% | "
                         f"{'/'.join(map(str, x['batches_per_rank']))} | {x['utterances_per_epoch']} | {fmt(x['seconds'], 2)} | "
                         f"{fmt(x['peak_traced_mb'])} |")
    lines += ["", "lhotse gets max_duration = frame budget / frames per second and the same bucket count; "
              "its ranks may get different batch counts (it drops or pads at the end), ours never do.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("manifest", "plan", "vocab", "cmvn", "noise", "params"):
        ap.add_argument(f"--{name}", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--phones", type=Path, default=None, help="phone lexicon, for a recipe with a phone CTC head")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: next to --out)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--startup-utterances", type=int, default=LIBRISPEECH_UTTERANCES, help="0: skip")
    ap.add_argument("--lhotse-large", action="store_true",
                    help="also compare the samplers on the LibriSpeech-size manifest (lhotse takes minutes there)")
    args = ap.parse_args(argv)
    args.work = args.work or args.out.parent / "data_path.work"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "probe":
        return probe_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    report = measure(args)
    write_json(args.out, report)
    md = render_markdown(report)
    if args.md:
        args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
