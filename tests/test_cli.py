"""The ``dpclip`` command line: output, JSON keys, one-line errors with exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from accountants import make_accountant
from dpclip import __version__
from dpclip.cli import main

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--noise-multiplier", "1.1", "--sample-rate", "0.01", "--steps", "500", "--delta", "1e-5"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def epsilon(kind: str, *segments, delta: float = 1e-5) -> float:
    acc = make_accountant(kind)
    for segment in segments:
        acc.step(*segment)
    return acc.get_epsilon(delta)


# -- budget epsilon --------------------------------------------------------------------------
def test_epsilon_human_output(capsys):
    code, out, err = run(capsys, "budget", "epsilon", *RUN)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["noise", "multiplier", "1.1"]
    assert any(line.startswith("steps") and "500 (5 epochs)" in line for line in lines)
    (row,) = [line for line in lines if line.startswith("epsilon (prv)")]
    assert "bounds [" in row
    value_columns = {re.match(r"^\S.*?\s{2,}(\S)", line).start(1) for line in lines}
    assert len(value_columns) == 1  # values aligned in one column


def test_epsilon_json_single_accountant(capsys):
    data = run_json(capsys, "budget", "epsilon", *RUN, "--accountant", "rdp")
    assert data["accountant"] == "rdp"
    assert data["delta"] == 1e-5
    assert data["steps"] == 500 and data["epochs"] == pytest.approx(5.0)
    assert data["history"] == [[1.1, 0.01, 500]]
    assert data["epsilon"] == pytest.approx(epsilon("rdp", (1.1, 0.01, 500)), rel=1e-12)
    assert "epsilon_bounds" not in data
    prv = run_json(capsys, "budget", "epsilon", *RUN)
    assert prv["accountant"] == "prv"
    assert set(prv["epsilon_bounds"]) == {"lower", "estimate", "upper"}
    assert prv["epsilon"] == prv["epsilon_bounds"]["upper"]


def test_epsilon_all_accountants(capsys):
    data = run_json(capsys, "budget", "epsilon", *RUN, "--accountant", "all")
    assert data["accountant"] == "all"
    assert set(data["epsilon"]) == {"prv", "rdp"}
    assert data["epsilon"]["prv"] <= data["epsilon"]["rdp"]
    assert set(data["epsilon_bounds"]) == {"prv"}
    code, out, _ = run(capsys, "budget", "epsilon", *RUN, "--accountant", "all")
    assert code == 0 and "epsilon (prv)" in out and "epsilon (rdp)" in out


def test_epochs_mean_steps_of_round_epochs_over_q(capsys):
    data = run_json(capsys, "budget", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.003",
                    "--epochs", "2", "--delta", "1e-5", "--accountant", "rdp")
    assert data["steps"] == round(2 / 0.003) == 667


def test_zero_noise_is_infinite_epsilon_null_in_json(capsys):
    argv = ["budget", "epsilon", "--noise-multiplier", "0", "--sample-rate", "0.01", "--steps", "3",
            "--delta", "1e-5", "--accountant", "all"]
    data = run_json(capsys, *argv)
    assert data["epsilon"] == {"prv": None, "rdp": None}
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.splitlines()[-1].split() == ["epsilon", "(rdp)", "inf"]


def test_schedule_file(capsys, tmp_path):
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps([
        {"noise_multiplier": 1.0, "sample_rate": 0.01, "epochs": 2},
        [2.0, 0.02, 100],
        {"noise_multiplier": 1.5, "sample_rate": 0.01, "steps": 50},
    ]))
    data = run_json(capsys, "budget", "epsilon", "--schedule", str(schedule), "--delta", "1e-5", "--accountant", "rdp")
    history = [(1.0, 0.01, 200), (2.0, 0.02, 100), (1.5, 0.01, 50)]
    assert data["history"] == [list(s) for s in history]
    assert data["steps"] == 350
    assert data["epsilon"] == pytest.approx(epsilon("rdp", *history), rel=1e-12)
    code, out, _ = run(capsys, "budget", "epsilon", "--schedule", str(schedule), "--delta", "1e-5")
    assert code == 0 and "segment 3" in out and "350 steps" in out


def test_schedule_accepts_an_accountant_state(capsys, tmp_path):
    acc = make_accountant("rdp")
    acc.step(1.0, 0.01, 100)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(acc.state_dict()))
    data = run_json(capsys, "budget", "epsilon", "--schedule", str(state), "--delta", "1e-5", "--accountant", "rdp")
    assert data["epsilon"] == acc.get_epsilon(1e-5)


# -- budget noise ----------------------------------------------------------------------------
def test_noise_json_and_human(capsys):
    argv = ["budget", "noise", "--target-epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "500"]
    data = run_json(capsys, *argv)
    assert data["accountant"] == "prv"
    sigma = data["noise_multiplier"]
    assert 2 * 0.99 <= epsilon("prv", (sigma, 0.01, 500)) <= 2.0
    assert data["epsilon"] == pytest.approx(epsilon("prv", (sigma, 0.01, 500)))
    assert data["target_epsilon"] == 2.0 and data["steps"] == 500
    code, out, _ = run(capsys, *argv, "--accountant", "all")
    assert code == 0
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "noise multiplier (prv)" in rows and "noise multiplier (rdp)" in rows
    shown = float(rows["noise multiplier (prv)"].split()[3])
    assert shown >= sigma  # rounded up: never less noise than calibrated


def test_noise_all_and_history(capsys, tmp_path):
    history = tmp_path / "done.json"
    history.write_text(json.dumps([{"noise_multiplier": 2.0, "sample_rate": 0.01, "steps": 200}]))
    data = run_json(capsys, "budget", "noise", "--target-epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01",
                    "--epochs", "3", "--accountant", "all", "--history", str(history))
    assert set(data["noise_multiplier"]) == {"prv", "rdp"}
    assert data["noise_multiplier"]["prv"] < data["noise_multiplier"]["rdp"]
    assert data["steps"] == 300 and data["history"] == [[2.0, 0.01, 200]]
    total = epsilon("rdp", (2.0, 0.01, 200), (data["noise_multiplier"]["rdp"], 0.01, 300))
    assert 2 * 0.99 <= total <= 2


# -- budget plot -----------------------------------------------------------------------------
def test_plot_writes_a_png(capsys, tmp_path):
    output = tmp_path / "curve.png"
    code, out, err = run(capsys, "budget", "plot", *RUN, "-o", str(output), "--points", "5")
    assert code == 0, err
    assert out.strip() == f"wrote {output}"
    data = output.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_plot_json_with_a_schedule(capsys, tmp_path):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps([[1.0, 0.01, 100], [2.0, 0.02, 100]]))
    output = tmp_path / "s.png"
    data = run_json(capsys, "budget", "plot", "--schedule", str(schedule), "--delta", "1e-5", "-o", str(output),
                    "--points", "4", "--accountant", "rdp")
    assert output.stat().st_size > 0
    assert data["steps"] == [0, 67, 133, 200]
    assert data["epsilon"]["rdp"][0] == 0.0
    assert data["epsilon"]["rdp"] == sorted(data["epsilon"]["rdp"])


# -- errors: one line on stderr, exit status 2, no traceback ---------------------------------
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "malformed": "[{\"noise_multiplier\": 1.0,",
        "not_a_list": "{\"noise_multiplier\": 1.0}",
        "empty": "[]",
        "missing_key": "[{\"noise_multiplier\": 1.0, \"steps\": 5}]",
        "both_lengths": "[{\"noise_multiplier\": 1.0, \"sample_rate\": 0.1, \"steps\": 5, \"epochs\": 1}]",
        "unknown_key": "[{\"noise_multiplier\": 1.0, \"sample_rate\": 0.1, \"steps\": 5, \"sigma\": 1}]",
        "bad_value": "[{\"noise_multiplier\": -1.0, \"sample_rate\": 0.1, \"steps\": 5}]",
        "bad_rate": "[[1.0, 1.5, 5]]",
        "bad_steps": "[[1.0, 0.5, 2.5]]",
        "bad_entry": "[\"abc\"]",
    }
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(text)
    return out


EPS = ["budget", "epsilon"]
NOISE = ["budget", "noise", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01"]
BAD = {
    "negative sigma": (EPS + ["--noise-multiplier", "-1", "--sample-rate", "0.01", "--steps", "5", "--delta", "1e-5"],
                       "--noise-multiplier"),
    "sigma not a number": (EPS + ["--noise-multiplier", "abc", "--sample-rate", "0.01", "--steps", "5",
                                  "--delta", "1e-5"], "--noise-multiplier"),
    "q zero": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0", "--steps", "5", "--delta", "1e-5"],
               "--sample-rate"),
    "q above one": (EPS + ["--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "5", "--delta", "1e-5"],
                    "--sample-rate"),
    "delta zero": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--delta", "0"],
                   "--delta"),
    "delta one": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--delta", "1"],
                  "--delta"),
    "negative steps": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "-5", "--delta", "1e-5"],
                       "--steps"),
    "fractional steps": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "2.5",
                                "--delta", "1e-5"], "--steps"),
    "negative epochs": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--epochs", "-1",
                               "--delta", "1e-5"], "--epochs"),
    "steps and epochs": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--epochs", "1", "--steps", "3",
                                "--delta", "1e-5"], "not allowed with"),
    "missing delta": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5"], "--delta"),
    "missing sigma": (EPS + ["--sample-rate", "0.1", "--steps", "5", "--delta", "1e-5"], "--noise-multiplier"),
    "missing steps": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--delta", "1e-5"], "--epochs/--steps"),
    "unknown accountant": (EPS + ["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5",
                                  "--delta", "1e-5", "--accountant", "gdp"], "--accountant"),
    "no command": ([], "required"),
    "no action": (["budget"], "required"),
    "unknown action": (["budget", "bogus"], "invalid choice"),
    "target epsilon zero": (["budget", "noise", "--target-epsilon", "0", "--delta", "1e-5", "--sample-rate", "0.01",
                             "--steps", "10"], "--target-epsilon"),
    "noise without length": (NOISE, "--epochs --steps"),
    "noise tolerance": (NOISE + ["--steps", "10", "--tolerance", "2"], "--tolerance"),
    "plot without output": (["budget", "plot", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5",
                             "--delta", "1e-5"], "--output"),
    "plot zero steps": (["budget", "plot", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0",
                         "--delta", "1e-5", "-o", "x.png"], "0 steps"),
    "plot one point": (["budget", "plot", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5",
                        "--delta", "1e-5", "-o", "x.png", "--points", "1"], "--points"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_and_status_2(capsys, name):
    argv, needle = BAD[name]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert needle in err, err


SCHEDULE_ERRORS = {
    "missing_file": "cannot read",
    "malformed": "not valid JSON (line 1",
    "not_a_list": "non-empty JSON list",
    "empty": "non-empty JSON list",
    "missing_key": "segment 1: needs sample_rate",
    "both_lengths": "steps or epochs (one)",
    "unknown_key": "unknown key 'sigma'",
    "bad_value": "segment 1: noise_multiplier must be >= 0",
    "bad_rate": "sample_rate must be in (0, 1]",
    "bad_steps": "steps must be an integer",
    "bad_entry": "segment 1: expected an object",
}


@pytest.mark.parametrize("name", sorted(SCHEDULE_ERRORS))
def test_bad_schedule_is_one_line_and_status_2(capsys, tmp_path, name):
    files = _bad_files(tmp_path)
    path = files.get(name, tmp_path / "does-not-exist.json")
    code, out, err = run(capsys, "budget", "epsilon", "--schedule", str(path), "--delta", "1e-5")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("dpclip: error: --schedule: ")
    assert SCHEDULE_ERRORS[name] in err, err


def test_schedule_and_single_run_flags_are_exclusive(capsys, tmp_path):
    schedule = tmp_path / "s.json"
    schedule.write_text("[[1.0, 0.1, 5]]")
    code, _, err = run(capsys, "budget", "epsilon", "--schedule", str(schedule), "--noise-multiplier", "1",
                       "--delta", "1e-5")
    assert code == 2 and "either --schedule or --noise-multiplier" in err and err.count("\n") == 1


def test_unreachable_target_is_one_line(capsys, tmp_path):
    history = tmp_path / "h.json"
    history.write_text("[[0.3, 0.5, 1000]]")
    code, _, err = run(capsys, *NOISE, "--steps", "10", "--history", str(history))
    assert code == 2 and "already spends" in err and err.count("\n") == 1


def test_plot_to_a_missing_directory_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "budget", "plot", *RUN, "-o", str(tmp_path / "no" / "such" / "dir.png"),
                       "--points", "2", "--accountant", "rdp")
    assert code == 2 and err.startswith("dpclip: error:") and err.count("\n") == 1


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"dpclip {__version__}"
    code, out, _ = run(capsys, "budget", "epsilon", "--help")
    assert code == 0 and "--noise-multiplier" in out and "--schedule" in out


# -- as a program ----------------------------------------------------------------------------
def test_python_m_dpclip_without_torch():
    argv = ["budget", "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.004", "--epochs", "1",
            "--delta", "1e-5", "--json"]
    done = subprocess.run([sys.executable, "-m", "dpclip", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["accountant"] == "prv" and data["steps"] == 250 and data["epsilon"] > 0
    check = ("import sys; from dpclip.cli import main; code = main(" + repr(argv) + "); "
             "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, capture_output=True, timeout=120)
    bad = subprocess.run([sys.executable, "-m", "dpclip", "budget", "epsilon", "--delta", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_train_prefers_passive_openmp_only_when_nothing_was_chosen():
    """dpclip train sets OMP_WAIT_POLICY=passive in its own process, unless the user set a
    policy or torch is already loaded (then the OpenMP runtime has read it already)."""
    from dpclip.cli import _prefer_passive_openmp

    env: dict[str, str] = {}
    assert _prefer_passive_openmp(env, {}) and env == {"OMP_WAIT_POLICY": "passive"}
    env = {"OMP_WAIT_POLICY": "active"}
    assert not _prefer_passive_openmp(env, {}) and env == {"OMP_WAIT_POLICY": "active"}
    env = {}
    assert not _prefer_passive_openmp(env, {"torch": object()}) and env == {}
