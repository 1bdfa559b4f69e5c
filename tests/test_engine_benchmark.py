"""Smoke test of the engine benchmark script (experiments/benchmarks/engine.py): it runs, writes
its JSON, and its correctness check passes. Speed itself is measured by the script, not here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scripts import ROOT

ENGINE = ROOT / "experiments" / "benchmarks" / "engine.py"


def test_engine_benchmark_runs_and_checks(tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, str(ENGINE), "--models", "mlp,cnn", "--methods", "dpclip auto", "--batch-size", "8",
         "--steps", "2", "--no-memory", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["settings"]["device"] == "cpu"
    for model in ("mlp", "cnn"):
        timing = res["models"][model]["timing"]
        for method in ("non-private", "dpclip auto"):
            row = timing[method]
            assert row["ms_median"] > 0 and row["steps"] == 2 and row["page_faults_median"] >= 0
        assert timing["dpclip auto"]["x_nonprivate"] > 0
        check = res["models"][model]["check"]["dpclip auto"]
        assert check["pass"] and check["rel_vs_f64"] < 1e-5
    assert "x non-priv" in proc.stdout and "faults" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_engine_benchmark_refuses_cuda_without_a_device():
    proc = subprocess.run(
        [sys.executable, str(ENGINE), "--device", "cuda", "--models", "mlp", "--no-memory"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


def test_engine_benchmark_separate_heaps(tmp_path):
    """--separate-heaps: each method in its own worker process, stepped round-robin."""
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, str(ENGINE), "--models", "mlp", "--methods", "dpclip auto",
         "--batch-size", "8", "--steps", "3", "--no-memory", "--no-check", "--separate-heaps", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["settings"]["separate_heaps"] is True
    timing = res["models"]["mlp"]["timing"]
    for method in ("non-private", "dpclip auto"):
        assert timing[method]["ms_median"] > 0 and timing[method]["steps"] == 3
    assert timing["dpclip auto"]["x_nonprivate"] > 0
    assert "its own process" in proc.stdout
