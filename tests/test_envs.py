"""envs/*.yaml, the Dockerfile and the install script agree on one set of pins; the install script
checks the disk first."""
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))


def requirement_pins():
    pins = {}
    for line in (REPO / "scripts" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned with =="
            pins[name.lower()] = version
    return pins


def test_there_is_one_env_per_rule_family():
    assert {p.stem for p in ENVS} == {"audio", "training", "evaluation", "tracking"}


@pytest.mark.parametrize("env_file", ENVS, ids=lambda p: p.name)
def test_env_parses_and_pins_match_the_install_script(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert env["channels"][0] == "conda-forge"
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1, "one pip section"
    pins = requirement_pins()
    for req in pip[0]["pip"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s]+)", req)
        assert m, f"{env_file.name}: {req!r} is not an exact pin"
        assert pins.get(m.group(1).lower()) == m.group(2), f"{env_file.name}: {req} differs from scripts/requirements.txt"


def test_every_rule_names_an_existing_env():
    used = set()
    for smk in (REPO / "rules").glob("*.smk"):
        used |= set(re.findall(r'conda:\s*\n\s*"\.\./envs/([\w-]+\.yaml)"', smk.read_text()))
    assert used and all((REPO / "envs" / name).exists() for name in used)


def test_dockerfile_runs_the_install_script():
    text = (REPO / "Dockerfile").read_text()
    assert "scripts/install.sh" in text and "ENTRYPOINT" in text


def test_install_stops_before_pip_when_the_disk_cannot_hold_the_venv(tmp_path):
    """A disk too small for the venv is named, with the numbers, before anything is installed (not
    `[Errno 28] No space left on device` halfway through pip): nothing is created."""
    venv = tmp_path / "venv"
    env = {**os.environ, "ASRFLOW_VENV": str(venv), "ASRFLOW_VENV_NEEDS_GB": "100000"}
    done = subprocess.run(["bash", "scripts/install.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    m = re.search(r"needs about 100000 GB free on the file system of (\S+); it has ([\d.]+) GB", done.stderr)
    assert m and m.group(1) == str(tmp_path), done.stderr
    assert 0 <= float(m.group(2)) < 100000
    assert "ASRFLOW_VENV=" in done.stderr  # the way out
    assert not venv.exists()
