"""`cnnviz bench` end to end on the embedded model: the four files, the table, errors."""
import csv
import json
import math

from cnnviz_fast.bench import METRICS, explainers
from cnnviz_fast.cli import main


def test_bench_writes_json_csv_markdown_and_html(tmp_path, capsys):
    chosen = ["grad_cam", "saliency"]
    chosen_metrics = ["deletion_auc", "insertion_auc", "pointing_game", "sparseness"]
    code = main(["bench", "--images", "2", "--explainers", ",".join(chosen), "--metrics", ",".join(chosen_metrics),
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    assert "bench.json" in capsys.readouterr().out
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert list(doc["explainers"]) == chosen and doc["metrics"] == chosen_metrics and doc["images"] == 2
    for row in doc["explainers"].values():
        assert row["images_per_s"] > 0 and row["peak_mib"] >= 0
        for name, s in row["metrics"].items():
            assert s["n"] + s["nan"] == 2
            assert 0.0 <= s["mean"] <= 1.0, name  # AUCs of softmax scores, a hit rate, a Gini index
            assert s["ci95"] >= 0 or math.isnan(s["ci95"])
    assert set(doc["curves"]) == {"deletion_auc", "insertion_auc"}
    assert all(len(c) == 33 for c in doc["curves"]["deletion_auc"].values())
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert len(rows) == len(chosen) * len(chosen_metrics)
    assert float(rows[0]["mean"]) == doc["explainers"]["grad_cam"]["metrics"]["deletion_auc"]["mean"]
    md = (tmp_path / "bench.md").read_text()
    assert "| explainer | images/s | peak MiB | deletion_auc ↓ | insertion_auc ↑" in md
    assert sum(line.startswith("| grad_cam") or line.startswith("| saliency") for line in md.splitlines()) == 2
    html = (tmp_path / "bench.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # the deletion and insertion plots
    assert "<h2>deletion</h2>" in html and "<h2>insertion</h2>" in html


def test_every_explainer_and_metric_is_listed():
    names = set(explainers("features"))
    assert {"grad_cam", "score_cam", "occlusion", "saliency", "integrated_gradients", "lrp"} <= names
    assert "grad_cam" not in explainers(None)
    assert {"deletion_auc", "pointing_game", "sparseness", "random_logit", "mprt_last_layer"} <= set(METRICS)


def test_bench_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--explainers", "nope", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnviz bench: error: --explainers: unknown nope") and err.count("\n") == 1
    assert main(["bench", "--model", "no_such_model", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--model" in capsys.readouterr().err
