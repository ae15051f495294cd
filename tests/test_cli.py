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
    assert pngs == sorted(heatmaps + ["embedding_pca.png", "top_k_patches.png"])
    # the grid: every input and every method's tile for it, plus the two investigation figures
    assert html.count("data:image/png;base64,") == 3 * (1 + len(heatmaps)) + 2
    assert "deconvnet</b>" in html and "checkerboard" in html and "true: " in html and "pred: " in html
    assert "src='http" not in html and not list(tmp_path.glob("*.tmp"))


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "cnnviz_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "info" in out.stdout


def test_demo_rejects_bad_count(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="n_images: expected >= 1"):
        main(["demo", "--out", str(tmp_path), "--images", "0", "--quiet"])
