"""The training entry point end to end on a tiny synthetic setup (no workflow): a run, resume after a
kill, refusing another config's checkpoint, Horovod with two processes, BatchNorm statistics and
gradient averaging across ranks, and skipping non-finite steps."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from . import trainer_fixtures as F

EPOCHS = 2


def ckpt_steps(out_dir: Path) -> list[int]:
    folder = out_dir / "checkpoints"
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"ckpt-(\d{8})\.pt", n)))


def latest_ckpt(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / f"ckpt-{ckpt_steps(out_dir)[-1]:08d}.pt"


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensor(s) differ, e.g. {different[:3]}"


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def mlflow_runs(setup: F.Setup, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(setup.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> F.Setup:
    return F.build_setup(tmp_path_factory.mktemp("trainer"))


@pytest.fixture(scope="module")
def run_a(setup):
    """The uninterrupted reference run (fp32, one process)."""
    out = setup.root / "run-a"
    result = ok(F.run(F.train_command(setup, setup.params_file("a"), out, setup.root / "logs-a", "trainer-single")))
    return out, result


# -- one process -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_single_process_run_trains_and_exports_a_loadable_model(setup, run_a):
    from asrflow.transcribe import emissions, load_for_model, load_model

    out, _ = run_a
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == EPOCHS and summary["stop_reason"] == f"{EPOCHS} epochs done"
    assert [h["epoch"] for h in summary["history"]] == list(range(EPOCHS))
    assert summary["world_size"] == 1 and summary["precision"] == "fp32" and summary["skipped_steps"] == 0
    steps_per_epoch = summary["history"][0]["step"]
    assert steps_per_epoch >= 4 and summary["global_step"] == EPOCHS * steps_per_epoch
    assert (setup.root / "logs-a" / "rank0.log").read_text().count("epoch 1 done") == 1

    client, runs = mlflow_runs(setup, "trainer-single")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, summary["global_step"] + 1))  # log_every=1
    first, last = history[0].value, history[-1].value
    assert last < 0.5 * first, f"train loss did not decrease: {first:.3f} -> {last:.3f}"
    assert runs[0].data.metrics["best_dev_loss"] == pytest.approx(summary["best_dev_loss"])

    model = load_model(out / "model.pt")
    assert model.vocab.symbols == json.loads(setup.vocab.read_text())["symbols"]
    dev = [u for u in setup.utts if u.split == "dev"][:2]
    log_probs, lens = emissions(model, [load_for_model(u.audio) for u in dev])
    assert log_probs.shape[0] == 2 and log_probs.shape[-1] == len(model.vocab)
    assert torch.isfinite(log_probs).all() and (lens > 0).all()
    assert torch.allclose(log_probs.exp().sum(-1)[0, : int(lens[0])], torch.ones(int(lens[0])), atol=1e-4)


# -- resume ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_b_killed_and_resumed(setup, run_a):
    """Run B (same recipe as A, a checkpoint every step, all kept) is SIGKILLed in its second epoch
    as soon as a checkpoint past the first epoch's end exists, then rerun in the same folder."""
    a_out, _ = run_a
    steps_per_epoch = json.loads((a_out / "train_summary.json").read_text())["history"][0]["step"]
    kill_after = steps_per_epoch + 2
    params = setup.params_file("b", checkpoint_every_steps=1, keep_last=1000)
    out = setup.root / "run-b"
    proc = subprocess.Popen(F.train_command(setup, params, out, experiment="trainer-resume"), cwd=F.REPO,
                            env=F.clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 240, False
    try:
        while proc.poll() is None and time.time() < deadline:
            steps = ckpt_steps(out)
            if steps and steps[-1] >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        _, stderr = proc.communicate(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL, \
        f"run B was not killed mid-run (exit {proc.returncode})\n{stderr[-4000:]}"
    assert not (out / "model.pt").exists()
    killed_at = ckpt_steps(out)[-1]
    payload = torch.load(latest_ckpt(out), map_location="cpu", weights_only=False)
    resumed = ok(F.run(F.train_command(setup, params, out, experiment="trainer-resume")))
    return {"out": out, "params": params, "killed_at": killed_at, "killed_state": payload["state"],
            "steps_per_epoch": steps_per_epoch, "resumed": resumed}


@pytest.mark.slow
def test_resume_after_sigkill_gives_bitwise_identical_weights(setup, run_a, run_b_killed_and_resumed):
    a_out, _ = run_a
    b = run_b_killed_and_resumed
    total = EPOCHS * b["steps_per_epoch"]
    # the kill really happened mid-training, in the second epoch (after the first epoch's dev score and
    # best.pt), typically a step or two past the checkpoint that triggered it
    state = b["killed_state"]
    assert not state["finished"] and state["epoch"] == 1 and 0 < state["batch_in_epoch"] <= b["steps_per_epoch"], state
    assert b["steps_per_epoch"] + 2 <= b["killed_at"] <= total and len(state["history"]) == 1
    killed_ckpt = b["out"] / "checkpoints" / f"ckpt-{b['killed_at']:08d}.pt"
    assert f"resuming from {killed_ckpt} (epoch 1, step {b['killed_at']})" in b["resumed"].stderr

    a_sum = json.loads((a_out / "train_summary.json").read_text())
    b_sum = json.loads((b["out"] / "train_summary.json").read_text())
    assert b_sum["global_step"] == a_sum["global_step"] == total
    assert [h["dev_loss"] for h in b_sum["history"]] == [h["dev_loss"] for h in a_sum["history"]]
    assert b_sum["best_dev_loss"] == a_sum["best_dev_loss"]
    assert_same_weights(F.load_state(a_out / "model.pt"), F.load_state(b["out"] / "model.pt"), "model.pt")
    final_a = torch.load(latest_ckpt(a_out), map_location="cpu", weights_only=False)
    final_b = torch.load(latest_ckpt(b["out"]), map_location="cpu", weights_only=False)
    assert_same_weights(final_a["model"], final_b["model"], "final checkpoint")
    opt_a, opt_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert_same_weights(opt_a[k], opt_b[k], f"optimizer state {k}")


@pytest.mark.slow
def test_resume_from_a_chosen_checkpoint_gives_bitwise_identical_weights(setup, run_a, run_b_killed_and_resumed):
    """Deterministic variant: run B's folder (every checkpoint kept) cut back to a mid-first-epoch
    checkpoint, exactly what a crash right after that checkpoint leaves behind, then rerun."""
    a_out, _ = run_a
    b = run_b_killed_and_resumed
    k = b["steps_per_epoch"] // 2
    out = setup.root / "run-c"
    (out / "checkpoints").mkdir(parents=True)
    for step in range(1, k + 1):
        shutil.copy2(b["out"] / "checkpoints" / f"ckpt-{step:08d}.pt", out / "checkpoints")
    state = torch.load(latest_ckpt(out), map_location="cpu", weights_only=False)["state"]
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (0, k, k)
    result = ok(F.run(F.train_command(setup, b["params"], out, experiment="trainer-resume")))
    assert f"(epoch 0, step {k})" in result.stderr
    assert_same_weights(F.load_state(a_out / "model.pt"), F.load_state(out / "model.pt"), "model.pt")
    assert_same_weights(F.load_state(latest_ckpt(a_out)), F.load_state(latest_ckpt(out)), "final checkpoint")


@pytest.mark.slow
def test_a_stopped_run_continues_when_its_limit_is_raised(setup, run_a):
    """max_steps stops mid-epoch; rerunning with the limit lifted continues from that batch (not from
    the next epoch, and not by re-exporting the stopped model)."""
    a_out, _ = run_a
    steps_per_epoch = json.loads((a_out / "train_summary.json").read_text())["history"][0]["step"]
    k = steps_per_epoch + 1
    out = setup.root / "run-limit"
    ok(F.run(F.train_command(setup, setup.params_file("limited", max_steps=k), out, experiment="trainer-limit")))
    first = json.loads((out / "train_summary.json").read_text())
    assert first["global_step"] == k and first["stop_reason"] == f"max_steps {k} reached"
    assert first["history"][-1]["partial"] is True and first["history"][-1]["epoch"] == 1
    ok(F.run(F.train_command(setup, setup.params_file("unlimited", max_steps=0), out, experiment="trainer-limit")))
    second = json.loads((out / "train_summary.json").read_text())
    assert second["global_step"] == EPOCHS * steps_per_epoch, "the rest of epoch 1 ran, nothing more"
    assert second["stop_reason"] == f"{EPOCHS} epochs done"
    assert [(h["epoch"], h["partial"]) for h in second["history"]] == [(0, False), (1, True), (1, False)]


@pytest.mark.slow
def test_checkpoint_of_another_configuration_is_refused(setup, run_a):
    a_out, _ = run_a
    out = setup.root / "run-other-config"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy2(latest_ckpt(a_out), out / "checkpoints")
    params = setup.params_file("bigger", model={**F.TINY_MODEL, "d_model": 48})
    result = F.run(F.train_command(setup, params, out, setup.root / "logs-other", "trainer-mismatch"))
    assert result.returncode != 0
    assert "CheckpointMismatch" in result.stderr and "different configuration" in result.stderr
    assert "params.model.d_model" in result.stderr  # the message names what differs
    assert not (out / "model.pt").exists() and not (out / "train_summary.json").exists()
    assert ckpt_steps(out) == ckpt_steps(a_out)[-1:]  # nothing overwritten
    _, runs = mlflow_runs(setup, "trainer-mismatch")
    assert [r.info.status for r in runs] == ["FAILED"]


# -- Horovod, two processes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def horovod_launch(setup):
    """One ``horovodrun -np 2 --gloo`` launch: ``bn_probe.py`` records what each rank holds after
    data-parallel steps, then the same processes run the real entry point (``asrflow.train.run.main``,
    i.e. ``workflow_scripts/train.py``) for a full bf16 training run. Sharing the launch halves the
    process start-ups (torch, Horovod, MLflow imports) that dominate these tests on two cores."""
    out, logs, dump = setup.root / "run-hvd", setup.root / "logs-hvd", setup.root / "bn-probe"
    # the weight mean and a voice adversary ride along: two ranks, bf16 autocast, exported from rank 0
    params = setup.params_file("hvd", precision="bf16", weight_average={"enabled": True, "start_step": 2, "every": 1},
                               voice_adversary={"enabled": True, "weight": 0.2, "label": "speaker", "hidden": 8,
                                                "ramp_steps": 2})
    probe = [F.PYTHON, str(Path(__file__).with_name("bn_probe.py")), str(dump), "--then-train",
             *setup.args(params, out, logs, "trainer-hvd")]
    result = ok(F.run(F.horovodrun(2, probe), timeout=400))
    return {"out": out, "logs": logs, "dump": dump, "result": result}


@pytest.mark.slow
def test_two_process_horovod_run(setup, horovod_launch):
    out, logs = horovod_launch["out"], horovod_launch["logs"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == EPOCHS
    assert summary["stop_reason"] == f"{EPOCHS} epochs done"
    assert summary["precision"] == "torch.bfloat16" and summary["skipped_steps"] == 0
    assert all(torch.isfinite(torch.tensor(h["dev_loss"])) for h in summary["history"])
    batches_per_rank = []
    for rank in (0, 1):
        text = (logs / f"rank{rank}.log").read_text()
        assert f"rank{rank} INFO world: 2 rank(s) over horovod" in text
        # audio comes through a DataLoader worker on every rank, and every rank gets as many batches
        m = re.search(r"(\d+) batches/epoch/rank, 1 loader worker\(s\)", text)
        assert m, text[-2000:]
        batches_per_rank.append(int(m.group(1)))
    assert batches_per_rank[0] == batches_per_rank[1] > 0
    assert "epoch 1 done" in (logs / "rank0.log").read_text()
    _, runs = mlflow_runs(setup, "trainer-hvd")  # only rank 0 talks to MLflow
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
    from asrflow.transcribe import load_model

    assert load_model(out / "model.pt").vocab.symbols == json.loads(setup.vocab.read_text())["symbols"]
    # model.pt is the mean of the weights after steps 2..N, as the final checkpoint carries it, in fp32
    assert summary["weight_average"] == {"steps_averaged": summary["global_step"] - 1, "start_step": 2, "every": 1}
    final = torch.load(latest_ckpt(out), map_location="cpu", weights_only=False)
    exported = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model"]
    mean = final["weight_average"]["weights"]
    assert final["weight_average"]["count"] == summary["global_step"] - 1
    assert all(torch.equal(exported[k], mean[k].to(exported[k].dtype)) for k in exported)
    # the voice adversary trained on every rank (its weights are in what the ranks compare, in the test below)
    # and stays out of model.pt
    assert "voice adversary on the encoder's output: 3 speakers" in (logs / "rank0.log").read_text()
    assert any(k.startswith("voice_adversary.") for k in final["model"])
    assert not any(k.startswith("voice_adversary.") for k in exported)
    assert any(not torch.equal(exported[k], final["model"][k]) for k in exported if exported[k].is_floating_point())


@pytest.mark.slow
def test_gradients_and_batchnorm_statistics_are_averaged_across_ranks(horovod_launch):
    dump = horovod_launch["dump"]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["size"]) == (0, 1, 2)

    # the ranks saw different data, so their local gradients differ ...
    assert r0["batch_ids"] != r1["batch_ids"]
    assert any(not torch.equal(r0["local_grads"][k], r1["local_grads"][k]) for k in r0["local_grads"])
    # ... yet after one DistributedOptimizer step the parameters are identical (and did move)
    assert_same_weights(r0["initial"], r1["initial"], "initial parameters")
    assert r0["skipped_after_step1"] == 0
    assert_same_weights(r0["after_step1"], r1["after_step1"], "parameters after one step")
    assert any(not torch.equal(r0["after_step1"][k], r0["initial"][k]) for k in r0["initial"])
    assert_same_weights(r0["end_of_epoch"], r1["end_of_epoch"], "parameters after an epoch")

    # BatchNorm running statistics: rank-specific after the epoch, equal after averaging
    assert r0["bn_layers_averaged"] == 2 and len(r0["bn_before"]) == 4
    assert all(not torch.equal(r0["bn_before"][k], r1["bn_before"][k]) for k in r0["bn_before"])
    assert_same_weights(r0["bn_after"], r1["bn_after"], "BatchNorm statistics after averaging")
    for k in r0["bn_after"]:
        assert torch.allclose(r0["bn_after"][k], (r0["bn_before"][k] + r1["bn_before"][k]) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ranks_stop_together_on_rank_0s_time_budget(horovod_launch):
    dump = horovod_launch["dump"]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1))
    # only rank 1 out of time: nobody stops early, both run to max_steps (3)
    assert r0["budget_steps"][1][0] == r1["budget_steps"][1][0] == 3
    assert "max_steps" in r0["budget_steps"][1][1] and "max_steps" in r1["budget_steps"][1][1]
    # rank 0 out of time: both stop after the first step, on rank 0's word
    assert r0["budget_steps"][0][0] == r1["budget_steps"][0][0] == 1
    assert "time budget" in r0["budget_steps"][0][1] and "time budget" in r1["budget_steps"][0][1]


# -- non-finite losses (in process, one rank) ------------------------------------------------------

def _snapshot(ctx) -> tuple[dict[str, torch.Tensor], dict]:
    import copy

    return ({k: v.detach().clone() for k, v in ctx.model.state_dict().items()},
            copy.deepcopy(ctx.optimizer.state_dict()))


def test_time_budget_and_max_steps_stop_a_single_process(setup, tmp_path):
    from asrflow.train.trainer import TrainState, train_one_epoch

    ctx = F.single_process_context(setup, tmp_path)
    ctx.params.time_budget_minutes = 1e-6
    state = TrainState(train_seconds=1.0)
    assert not train_one_epoch(ctx, state)
    assert state.global_step == 1 and state.stop_reason.startswith("time budget")
    ctx.params.time_budget_minutes, ctx.params.max_steps = 0.0, 3
    state = TrainState()
    assert not train_one_epoch(ctx, state)
    assert state.global_step == 3 and state.stop_reason == "max_steps 3 reached"


def test_agree_on_step_on_one_rank():
    from asrflow.train.distributed import World
    from asrflow.train.trainer import agree_on_step

    world = World()
    assert agree_on_step(torch.tensor(1.5), world) == (True, False)
    assert agree_on_step(torch.tensor(1.5), world, stop_vote=True) == (True, True)
    assert not agree_on_step(torch.tensor(float("nan")), world)[0]
    assert not agree_on_step(torch.tensor(float("inf")), world)[0]
    assert not agree_on_step(torch.tensor([1.0, float("-inf")]), world)[0]


class _NaNLossOnCalls(torch.nn.Module):
    """The real training loss, made NaN (still attached to the graph) on chosen calls."""

    def __init__(self, inner: torch.nn.Module, bad_calls: set[int]):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

    def forward(self, *args):
        self.calls += 1
        out = self.inner(*args)
        if self.calls in self.bad_calls:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_step_is_skipped_counted_and_leaves_weights_unchanged(setup, tmp_path):
    from asrflow.train.trainer import TrainState

    ctx = F.single_process_context(setup, tmp_path)
    ctx.loss_fn = _NaNLossOnCalls(ctx.loss_fn, bad_calls={2})
    state = TrainState()
    F.run_steps(ctx, state, 1)
    assert state.skipped_steps == 0
    weights, opt = _snapshot(ctx)

    F.run_steps(ctx, state, 1)  # NaN loss: no update of weights nor of Adam's moments and step count
    assert state.skipped_steps == 1 and state.batch_in_epoch == 2
    after_weights, after_opt = _snapshot(ctx)
    assert_same_weights(weights, after_weights, "weights after a NaN step")
    for k in opt["state"]:
        assert_same_weights(opt["state"][k], after_opt["state"][k], f"optimizer state {k} after a NaN step")

    F.run_steps(ctx, state, 1)  # the next finite step trains again
    assert state.skipped_steps == 1
    moved = ctx.model.state_dict()
    assert any(not torch.equal(weights[k], moved[k]) for k, _ in ctx.model.named_parameters())


def test_gradient_overflow_under_a_grad_scaler_skips_the_update_and_backs_off_the_scale(setup, tmp_path):
    """fp16's failure mode, reproduced on CPU: a finite loss whose scaled gradients overflow. The one
    training step skips the update (weights and Adam state untouched), counts it, and the scaler backs off."""
    from asrflow.train.trainer import TrainState

    ctx = F.single_process_context(setup, tmp_path)
    state = TrainState()
    F.run_steps(ctx, state, 1)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=3e38, growth_interval=1)
    weights, opt = _snapshot(ctx)
    F.run_steps(ctx, state, 1)
    assert state.skipped_steps == 1
    assert ctx.scaler.get_scale() < 3e38
    after_weights, after_opt = _snapshot(ctx)
    assert_same_weights(weights, after_weights, "weights after an overflowing step")
    for k in opt["state"]:
        assert_same_weights(opt["state"][k], after_opt["state"][k], f"optimizer state {k} after an overflow")
    assert all(p.grad is None or not p.grad.any() for p in ctx.model.parameters())


def test_nan_in_the_forward_pass_does_not_poison_batchnorm_statistics(setup, tmp_path):
    """A batch whose activations go NaN (the realistic source of a NaN loss) is skipped; its forward
    pass must not leave NaN in BatchNorm running statistics, or every later evaluation is NaN."""
    from asrflow.train.trainer import TrainState, evaluate_dev

    ctx = F.single_process_context(setup, tmp_path, specaugment={"enabled": False})
    real_logmel = ctx.logmel
    calls = {"n": 0}

    class NaNFeaturesOnce(torch.nn.Module):
        def forward(self, waves, lens):
            calls["n"] += 1
            feats, feat_lens = real_logmel(waves, lens)
            return (feats * float("nan"), feat_lens) if calls["n"] == 2 else (feats, feat_lens)

    ctx.logmel = NaNFeaturesOnce()
    state = TrainState()
    F.run_steps(ctx, state, 1)
    weights, _ = _snapshot(ctx)
    F.run_steps(ctx, state, 1)
    assert state.skipped_steps == 1
    after, _ = _snapshot(ctx)
    assert_same_weights(weights, after, "model state (parameters and BatchNorm buffers) after a NaN step")
    F.run_steps(ctx, state, 1)
    assert all(torch.isfinite(v).all() for v in ctx.model.state_dict().values())
    ctx.logmel = real_logmel
    dev = evaluate_dev(ctx)
    assert all(torch.isfinite(torch.tensor(v)) for v in dev.values()), dev


@pytest.mark.slow
def test_the_workflow_flag_moves_stale_checkpoints_aside_and_starts_fresh(setup, run_a):
    """The train rule passes --archive-stale-checkpoints: after a recipe change Snakemake reruns the
    rule, and the old recipe's checkpoints are kept aside instead of blocking the rerun."""
    a_out, _ = run_a
    out = setup.root / "run-archive"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy2(latest_ckpt(a_out), out / "checkpoints")
    params = setup.params_file("archive", model={**F.TINY_MODEL, "d_model": 48}, epochs=1)
    result = ok(F.run(F.train_command(setup, params, out, experiment="trainer-archive") + ["--archive-stale-checkpoints"]))
    assert "training from scratch" in result.stderr
    stale = [p for p in out.iterdir() if p.name.startswith("checkpoints.stale-")]
    assert len(stale) == 1 and list(stale[0].glob("ckpt-*.pt")), "the old checkpoints are kept"
    assert json.loads((out / "train_summary.json").read_text())["epochs"] == 1


def test_augmentation_starts_at_augment_after_steps(setup, tmp_path):
    """Before ``augment_after_steps`` the model sees exactly the clean features; from that step on, the
    noise and SpecAugment of the recipe (seeded per step, so a resumed run draws the same)."""
    from asrflow.train.trainer import features, step_seed, training_step

    ctx = F.single_process_context(setup, tmp_path, augment_after_steps=3,
                                  noise={"enabled": True, "p": 1.0, "snr_db": [0.0, 0.0]})
    seen = []
    forward = ctx.model.forward
    ctx.model.forward = lambda feats, lens, normalized=False: (seen.append(feats.detach().clone()),
                                                               forward(feats, lens, normalized))[1]
    ids = ctx.sampler.global_batches(0)[0]
    batch = ctx.loader.reader[ids]
    clean, _ = features(batch, ctx.logmel, ctx.model, None, ctx.device)
    for step in (0, 2, 3, 4):
        ctx.aug.reseed(step_seed(ctx.params, 0, 0, 0))
        training_step(ctx, batch, step)
    assert torch.equal(seen[0], clean) and torch.equal(seen[1], clean), "augmented before augment_after_steps"
    for feats in seen[2:]:
        # 0 dB noise on every utterance: far from the clean features on real frames
        assert (feats - clean).abs().mean() > 0.3, "no augmentation from augment_after_steps on"


def test_bpe_units_train_export_and_transcribe(setup, tmp_path):
    """The same trainer on BPE pieces: targets are pieces, the exported model carries the
    sentencepiece model, and transcription spells words back from pieces."""
    from asrflow.text import BpeVocab
    from asrflow.train.distributed import World
    from asrflow.train.params import TrainParams
    from asrflow.train.run import build_context, export_model, parse_args
    from asrflow.train.trainer import TrainState
    from asrflow.transcribe import load_model, transcribe

    texts = [u.text for u in setup.utts if u.split == "train"]
    bpe = BpeVocab.build(texts, vocab_size=16)
    vocab_path = tmp_path / "bpe.json"
    bpe.save(vocab_path)
    params_path = setup.params_file("bpe")
    argv = setup.args(params_path, tmp_path / "out")
    argv[argv.index("--vocab") + 1] = str(vocab_path)
    threads = torch.get_num_threads()
    ctx = build_context(parse_args(argv), TrainParams.from_config(json.loads(params_path.read_text())), World())
    torch.set_num_threads(threads)
    assert ctx.model.head.out_features == len(bpe)
    first = next(u for u in setup.utts if u.split == "train")
    batch = ctx.loader.reader[[first.id]]
    assert int(batch.target_lens[0]) == len(bpe.encode(first.text)) < len(first.text)
    assert bpe.decode(batch.targets[0].tolist()) == first.text
    state = TrainState()
    F.run_steps(ctx, state, 4)
    assert state.skipped_steps == 0
    (tmp_path / "out").mkdir(exist_ok=True)
    export_model(ctx, state, tmp_path / "out" / "model.pt")
    # the waveform front end prep applied travels with the model (transcribe applies the same)
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=False)["frontend"] == {
        "sample_rate": 16000, "target_rms_dbfs": -23.0, "peak_ceiling_dbfs": -1.0}
    model = load_model(tmp_path / "out" / "model.pt")
    assert isinstance(model.vocab, BpeVocab) and model.vocab.identity() == bpe.identity()
    (hyp,) = transcribe(model, [first.audio])
    assert isinstance(hyp, str) and set(hyp) <= set("ABCDE '")


def test_init_from_an_earlier_model_with_another_vocabulary_on_a_fresh_start_only(setup, tmp_path):
    """training.init_from: a fresh run starts from the parent's encoder (its output layer is new: the
    vocabulary differs, the log says so); a resumed run keeps its own weights."""
    from asrflow.text import BpeVocab
    from asrflow.train.distributed import World
    from asrflow.train.params import TrainParams
    from asrflow.train.run import build_context, export_model, parse_args
    from asrflow.train.trainer import TrainState, resume, save

    parent_ctx = F.single_process_context(setup, tmp_path / "parent")
    state = TrainState()
    F.run_steps(parent_ctx, state, 2)
    (tmp_path / "parent").mkdir(exist_ok=True)
    export_model(parent_ctx, state, tmp_path / "parent" / "model.pt")
    parent = torch.load(tmp_path / "parent" / "model.pt", weights_only=False)["model"]

    bpe = BpeVocab.build([u.text for u in setup.utts if u.split == "train"], vocab_size=16)
    bpe.save(tmp_path / "bpe.json")
    params_path = setup.params_file("child", init_from=str(tmp_path / "parent" / "model.pt"))
    argv = setup.args(params_path, tmp_path / "child")
    argv[argv.index("--vocab") + 1] = str(tmp_path / "bpe.json")
    threads = torch.get_num_threads()
    ctx = build_context(parse_args(argv), TrainParams.from_config(json.loads(params_path.read_text())), World())
    torch.set_num_threads(threads)
    fresh_head = ctx.model.head.weight.detach().clone()
    resume(ctx)
    own = ctx.model.state_dict()
    encoder = [k for k in parent if k.startswith("encoder.")]
    assert encoder and all(torch.equal(own[k], parent[k]) for k in encoder), "the parent's encoder is loaded"
    assert own["head.weight"].shape[0] == len(bpe) != parent["head.weight"].shape[0]
    assert torch.equal(own["head.weight"], fresh_head), "a changed vocabulary gets a new output layer"
    assert ctx.init_report is not None and not ctx.init_report.head_loaded and "vocabulary differs" in ctx.init_report.head_reason

    # a checkpoint of the child exists now: resuming must not load the parent again
    (tmp_path / "child").mkdir(exist_ok=True)
    with torch.no_grad():
        ctx.model.encoder.conformer.conformer_layers[0].ffn1.sequential[1].weight.add_(1.0)
    save(ctx, TrainState(global_step=1), is_best=False)
    mine = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    ctx.init_report = None
    resume(ctx)
    assert ctx.init_report is None
    assert all(torch.equal(ctx.model.state_dict()[k], mine[k]) for k in mine), "a resume keeps its own weights"


# a randomly initialised two-block whisper_encoder (its own log-mel front end), small enough for the tiny setup
TINY_WHISPER_MODEL = {"name": "whisper_encoder", "d_model": 32, "num_layers": 2, "num_heads": 4, "ffn_dim": 64,
                      "n_mels": 80, "max_positions": 200, "head_lstm_layers": 1, "head_lstm_hidden": 16}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng makes the phone targets (make install)")
@pytest.mark.parametrize("model_config", [
    {**F.TINY_MODEL, "phone_ctc_layer": 1},
    {**TINY_WHISPER_MODEL, "phone_ctc_layer": 1},   # below the top block
    {**TINY_WHISPER_MODEL, "phone_ctc_layer": 2},   # the encoder's own output, below the BiLSTM
], ids=["conformer", "whisper-block-1", "whisper-output"])
def test_auxiliary_phone_ctc_trains_its_head_and_the_exported_model_transcribes(setup, tmp_path, model_config):
    """A phone CTC head: the batches carry espeak-ng phone targets, the phone loss falls with training, and
    the exported model (phone head included) rebuilds and transcribes on its own."""
    from asrflow.phones import PhoneLexicon
    from asrflow.train.distributed import World
    from asrflow.train.params import TrainParams
    from asrflow.train.run import build_context, export_model, parse_args
    from asrflow.train.trainer import TrainState, forward_batch, train_one_epoch
    from asrflow.transcribe import load_model, transcribe

    lexicon = PhoneLexicon.build(u.text for u in setup.utts if u.split in ("train", "dev"))
    phones_path = tmp_path / "phones.json"
    lexicon.save(phones_path)
    overrides = {"model": model_config,
                 "loss": {"kind": "smoothed", "smoothing": 0.1, "phone_ctc_weight": 0.3},
                 "noise": {"enabled": False}, "specaugment": {"enabled": False}}
    params_path = setup.params_file("phones", **overrides)
    argv = setup.args(params_path, tmp_path / "out")
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="no --phones lexicon"):
        build_context(parse_args(argv), TrainParams.from_config(json.loads(params_path.read_text())), World())
    unpaired = setup.params_file("unpaired", **{**overrides, "loss": {"kind": "smoothed"}})
    with pytest.raises(ValueError, match="phone head would never be trained"):
        build_context(parse_args(setup.args(unpaired, tmp_path / "out") + ["--phones", str(phones_path)]),
                      TrainParams.from_config(json.loads(unpaired.read_text())), World())
    ctx = build_context(parse_args(argv + ["--phones", str(phones_path)]),
                        TrainParams.from_config(json.loads(params_path.read_text())), World())
    torch.set_num_threads(threads)
    assert ctx.model.phone_head.out_features == len(lexicon)
    train_ids = sorted(u.id for u in setup.utts if u.split == "train")[:4]
    batch = ctx.loader.reader[train_ids]
    for row, uid in enumerate(train_ids):
        expected = lexicon.encode(ctx.index.text(uid))
        assert batch.phone_targets[row, : batch.phone_target_lens[row]].tolist() == expected

    loss_fn = ctx.eval_loss_fn

    def phone_loss() -> float:
        ctx.model.eval()
        with torch.no_grad():
            _, out_lens = forward_batch(ctx.model, batch, ctx.logmel, None, ctx.device, ctx.amp_dtype)
            value = loss_fn(ctx.model.phone_log_probs, out_lens, batch.phone_targets, batch.phone_target_lens).loss
        ctx.model.train()
        return float(value)

    before = phone_loss()
    state = TrainState()
    ctx.params.max_steps = 21
    for epoch in range(3):
        state.epoch, state.batch_in_epoch = epoch, 0
        train_one_epoch(ctx, state)
    after = phone_loss()
    assert state.skipped_steps == 0
    assert after < 0.8 * before, f"phone CTC loss {before:.3f} -> {after:.3f}: the phone head did not learn"
    assert ctx.model.phone_head.weight.grad is not None
    (tmp_path / "out").mkdir(exist_ok=True)
    export_model(ctx, state, tmp_path / "out" / "model.pt")
    exported = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    assert exported["model_config"]["phone_vocab_size"] == len(lexicon)
    model = load_model(tmp_path / "out" / "model.pt")
    (hyp,) = transcribe(model, [setup.utts[0].audio])
    assert isinstance(hyp, str) and set(hyp) <= set("ABCDE '")
