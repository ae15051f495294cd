"""The console script: `cnnviz info` and `cnnviz demo` end to end on the embedded model."""
import re
import subprocess
import sys

from cnnviz_fast.cli import main
from cnnviz_fast.demo import _methods


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"torch \d+\.\d+", out)
    assert re.search(r"cpp\s+yes", out) and "reference" in out and "triton" in out


def test_demo_writes_pngs_and_a_self_contained_report(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--images", "3", "--quiet"]) == 0
    html = (tmp_path / "report.html").read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    heatmaps = [f"{name}.png" for name, _, _ in _methods()]
    synthesis = ["filters.png", "class_visualization.png", "feature_inversion.png"]
    scouter = ["scouter.png", "scouter_confusable.png"]
    assert pngs == sorted(heatmaps + ["embedding_pca.png", "top_k_patches.png"] + synthesis + scouter)
    # the grid: every input and every method's tile for it, plus one figure each for the two
    # investigation views, the synthesis views and the SCOUTER views
    assert html.count("data:image/png;base64,") == 3 * (1 + len(heatmaps)) + 2 + len(synthesis) + len(scouter)
    assert "deconvnet</b>" in html and "checkerboard" in html and "true: " in html and "pred: " in html
    # the explainer benchmark of the same images, written beside the report and linked from it
    assert "<a href='bench/bench.html'>" in html and (tmp_path / "bench" / "bench.html").is_file()
    assert "src='http" not in html and not list(tmp_path.glob("*.tmp"))


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "cnnviz_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "info" in out.stdout


def test_demo_rejects_bad_count_as_a_usage_error(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path), "--images", "0", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cnnviz demo") and "--images: expected a whole number >= 1, got 0" in err
    assert "Traceback" not in err
