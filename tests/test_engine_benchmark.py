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


AB = ROOT / "experiments" / "benchmarks" / "ab_trees.py"


def test_ab_trees_steps_each_cell_in_its_own_process(tmp_path):
    """Two cells of this tree (one with a worker setting) are stepped round-robin and reported."""
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(AB), "--model", "mlp", "--steps", "3", "--json", str(out),
         f"np={ROOT}:non-private", f"dp={ROOT}:dpclip auto|AB_NOISE=0.5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["times_s"]) == {"np", "dp"} and all(len(v) == 3 for v in res["times_s"].values())
    assert all(v > 0 for v in res["median_ms"].values())
    assert "x ref" in proc.stdout and "dp " in proc.stdout


def test_ab_trees_refuses_a_tree_without_its_own_dpclip(tmp_path):
    bench = tmp_path / "experiments" / "benchmarks"
    bench.mkdir(parents=True)
    (bench / "engine.py").write_text(ENGINE.read_text())
    proc = subprocess.run(
        [sys.executable, str(AB), "--model", "mlp", "--steps", "1", f"x={tmp_path}:non-private"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "not from" in proc.stderr


def test_ab_trees_cell_syntax():
    sys.path.insert(0, str(AB.parent))
    try:
        from ab_trees import parse_cell
    finally:
        sys.path.remove(str(AB.parent))
    label, tree, method, env = parse_cell("new=.:dpclip auto|AB_NOISE=0|X=a=b")
    assert (label, method, env) == ("new", "dpclip auto", {"AB_NOISE": "0", "X": "a=b"})
    for bad in ("new", "new=.", "=.:m", "new=.:m|X"):
        with pytest.raises(ValueError, match="cell"):
            parse_cell(bad)


def test_round_order_is_a_seeded_permutation_with_varied_predecessors():
    sys.path.insert(0, str(ENGINE.parent))
    try:
        from engine import round_order
    finally:
        sys.path.remove(str(ENGINE.parent))
    names = ["non-private", "dpclip auto", "opacus hooks", "opacus ghost"]
    orders = [round_order(names, k) for k in range(20)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [round_order(names, k) for k in range(20)]  # reproducible
    assert names == ["non-private", "dpclip auto", "opacus hooks", "opacus ghost"]  # not shuffled in place
    # across the run a method is stepped right after different methods (a rotating start
    # would always put "dpclip auto" right after "non-private")
    sequence = [m for o in orders for m in o]
    before = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == "dpclip auto"}
    assert len(before) >= 3
