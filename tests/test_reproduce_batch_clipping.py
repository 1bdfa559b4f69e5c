"""experiments/reproduce/batch_clipping.py and its report: one tiny cell per method on synthetic IDX files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from tests.data_files import synthetic_arrays, write_idx_folder
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "experiments" / "reproduce"


def _load(name: str):
    return load_script(SCRIPTS / f"{name}.py")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """IDX files of a learnable synthetic set where Fashion-MNIST's loader looks for them (no download)."""
    folder = tmp_path_factory.mktemp("fashion")
    write_idx_folder(folder / "FashionMNIST" / "raw", synthetic_arrays(200, 100, learnable=True))
    return folder


TINY = dict(train_subset=200, batch_size=100, epochs=1, width=4, threads=1)


def test_cells_run_and_the_report_is_made(tmp_path, fashion_dir):
    bc = _load("batch_clipping")
    report = _load("batch_clipping_report")
    results = tmp_path / "results"
    cells = [("bc", 8.0, dict(batch_clip_size=4)), ("bc-alc", 8.0, dict(batch_clip_size=2)), ("ic", 8.0, {}),
             ("ic-alc", 8.0, {}), ("nonprivate", None, {})]
    for method, eps, extra in cells:
        summary = bc.run_cell(method, eps, 0, results=results, log=io.StringIO(), data_dir=str(fashion_dir),
                              **TINY, **extra)
        folder = results / bc.cell_name(method, eps, 0)
        assert not (folder / "checkpoint.pt").exists()
        assert (folder / "metrics.csv").exists() and (folder / "result.json").exists()
        assert json.loads((folder / "summary.json").read_text()) == summary
        assert summary["steps"] == 2 and summary["method"] == method and summary["command"].startswith("nice -n 10")
        if method == "nonprivate":
            assert summary["noise_multiplier"] == 0.0 and summary["target_epsilon"] is None
        else:
            assert summary["epsilon"] <= 8.0 + 0.05 and summary["noise_multiplier"] > 0
    alc = json.loads((results / "bc-alc-eps8-s0" / "summary.json").read_text())
    assert alc["layerwise"] and alc["clip_controller"] == "quantile" and len(alc["clip_thresholds"]) > 1
    assert json.loads((results / "ic-eps8-s0" / "summary.json").read_text())["model"] == "resnet18"

    md, png = tmp_path / "batch_clipping.md", tmp_path / "batch_clipping.png"
    assert report.main(["--results", str(results), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert png.stat().st_size > 1000
    for method, _, _ in cells:
        assert bc.LABELS[method] in text
    assert "batch_clipping.py cell --method bc-alc --epsilon 8 --seed 0" in text
    assert "| n |" in text and "surrogate" in text


def test_grid_order_and_config():
    bc = _load("batch_clipping")
    cells = bc.grid_cells([0, 1], ["bc", "ic", "nonprivate"], [3.0, 8.0])
    assert cells[:5] == [("bc", 3.0, 0), ("ic", 3.0, 0), ("bc", 8.0, 0), ("ic", 8.0, 0), ("nonprivate", None, 0)]
    assert len(cells) == 10
    cfg = bc.make_config("bc-alc", 3.0, 0, None)
    assert cfg.clipping == "batch" and cfg.layerwise and cfg.clip_controller == "quantile"
    assert cfg.model == "resnet18-bn" and cfg.target_epsilon == 3.0 and cfg.noise_multiplier is None
    assert bc.make_config("nonprivate", None, 0, None).noise_multiplier == 0.0
    with pytest.raises(ValueError):
        bc.make_config("ic", None, 0, None)
