"""The container image of `make image`, run for real with podman: its installed versions against the
pins, the small workflow on a mounted folder, `asrflow-transcribe` on a mounted file, and the fast
test suite, all inside the image.

Skips (and says why) when podman is missing, no image was built (`make image` first; CI does not
build it) or the image holds another commit than this checkout's HEAD (ASRFLOW_IMAGE_ANY_COMMIT=1
runs it anyway). The image holds the commit it was built from (`git archive HEAD`), not this
working tree's uncommitted edits.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from asrflow.manifest import read_manifest

from .test_envs import requirement_pins

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("ASRFLOW_IMAGE", "localhost/asrflow:latest")
RUN = REPO / "scripts" / "container_run.sh"
pytestmark = [pytest.mark.slow, pytest.mark.container]


def image_labels() -> dict | None:
    if not shutil.which("podman"):
        return None
    proc = subprocess.run(["podman", "image", "inspect", IMAGE], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0].get("Labels") or {}


@pytest.fixture(scope="module")
def image():
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman buildah mmdebstrap runc; then make image)")
    labels = image_labels()
    if labels is None:
        pytest.skip(f"no image {IMAGE}: run `make image` first (CI does not build it)")
    built = labels.get("org.opencontainers.image.revision", "?")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head and built != head and os.environ.get("ASRFLOW_IMAGE_ANY_COMMIT") != "1":
        # an image of another commit tests that commit (and may predate its pins): rebuild, or say so
        pytest.skip(f"{IMAGE} holds commit {built[:12]}, this checkout is {head[:12]}: `make image` rebuilds it "
                    "(seconds when only the source changed); ASRFLOW_IMAGE_ANY_COMMIT=1 runs it anyway")
    print(f"{IMAGE}: commit {built}, dependencies {labels.get('asrflow.deps', '?')}")
    return IMAGE


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def podman(*args, timeout=1800, check=True):
    """scripts/container_run.sh (podman run --rm with this VM's options) with ``args``."""
    proc = subprocess.run(["bash", str(RUN), "--shm-size=2g", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "ASRFLOW_IMAGE": IMAGE})
    if check and proc.returncode != 0:
        raise AssertionError(f"podman run {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_installed_versions_match_the_pins(image):
    out = podman("--entrypoint", "python", image, "-c",
                 "import json, sys, importlib.metadata as md; "
                 "print(json.dumps({'python': list(sys.version_info[:2]), "
                 "'dists': {d.metadata['Name'].lower().replace('_', '-'): d.version for d in md.distributions()}}))").stdout
    info = json.loads(out.strip().splitlines()[-1])
    installed = {norm(name): version for name, version in info["dists"].items()}
    differ = {name: (version, installed.get(norm(name))) for name, version in requirement_pins().items()
              if installed.get(norm(name)) != version}
    assert not differ, f"image {image} differs from scripts/requirements.txt (pin, installed): {differ}; rebuild: make image"
    assert installed.get("horovod") == "0.28.1"
    # envs/*.yaml: python=3.11 and their pip pins (tests/test_envs.py ties those to requirements.txt;
    # checked here against the image directly)
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        env = yaml.safe_load(env_file.read_text())
        assert "python=3.11" in env["dependencies"] and info["python"] == [3, 11], env_file.name
        for req in next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]:
            name, _, version = req.partition("==")
            assert installed.get(norm(name)) == version, f"{env_file.name}: {req}, image has {installed.get(norm(name))}"


@pytest.fixture(scope="module")
def workflow_run(image, tmp_path_factory):
    work = tmp_path_factory.mktemp("container-work")
    # the entry point: snakemake -s /opt/asrflow/Snakefile in /work
    proc = podman("-v", f"{work}:/work", image, "--cores", "2", "--configfile", "/opt/asrflow/config/small.yaml",
                  timeout=2400, check=False)
    return work, proc


def test_small_workflow_runs_to_the_end_on_a_mounted_folder(workflow_run):
    work, proc = workflow_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert re.search(r"\d+ of \d+ steps \(100%\) done", proc.stderr), proc.stderr[-3000:]
    assert (work / "results/train/full/model.pt").stat().st_size > 0
    metrics = json.loads((work / "results/eval/full/metrics.json").read_text())
    assert metrics
    assert (work / "results/benchmark/benchmark.md").exists()
    summary = json.loads((work / "results/train/full/train_summary.json").read_text())
    assert summary


def test_transcribe_a_mounted_file(workflow_run, tmp_path):
    work, proc = workflow_run
    assert proc.returncode == 0, "the workflow run failed (see the test above)"
    # a prepared test utterance (the corpus also holds the deliberately broken files)
    first = next(u for u in read_manifest(work / "results/prep/truncated.jsonl") if u.split == "test")
    wav = Path(first.audio)
    if not wav.exists() and wav.is_relative_to("/work"):  # written as a path inside the container
        wav = work / wav.relative_to("/work")
    data = tmp_path / "audio"
    data.mkdir()
    shutil.copy(wav, data / "utterance.wav")
    out = podman("-v", f"{work / 'results/train/full'}:/model:ro", "-v", f"{data}:/data:ro",
                 "--entrypoint", "asrflow-transcribe", IMAGE, "--model", "/model/model.pt", "/data/utterance.wav").stdout
    # one line per file: path TAB transcript (the tiny model of config/small.yaml may well say nothing)
    path, tab, text = out.rstrip("\n").splitlines()[-1].partition("\t")
    assert path == "/data/utterance.wav" and tab, out
    print(f"transcript: {text!r} (reference {first.text!r})")


def test_fast_suite_inside_the_image(image):
    # the image's own tests (those of its commit) in /opt/asrflow; -m "not slow" leaves out the
    # workflow, horovodrun, SLURM and network-namespace tests (and this file)
    proc = podman("-w", "/opt/asrflow", "--entrypoint", "python", image, "-m", "pytest", "-m", "not slow",
                  "-p", "no:cacheprovider", "-q", "tests", timeout=2400, check=False)
    tail = proc.stdout[-5000:]
    assert proc.returncode == 0, f"{tail}\n{proc.stderr[-3000:]}"
    assert re.search(r"\d+ passed", tail), tail
    print(tail.strip().splitlines()[-1])
