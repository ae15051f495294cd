"""Report building blocks: Captum's colour scaling, grids and tables, the old figure API."""
import numpy as np
import pytest
import torch

from cnnviz_fast.report import Column, Report, Row
from cnnviz_fast.viz import clip_maps, colormap_stops, heat_overlay, outlier_scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipping_matches_captum_visualize_image_attr(seed):
    viz = pytest.importorskip("captum.attr._utils.visualization", reason="captum is not installed")
    maps = torch.randn(3, 17, 23, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails
    for i, m in enumerate(maps.numpy()):
        assert outlier_scale(maps)[i].item() == pytest.approx(viz._cumulative_sum_threshold(np.abs(m), 98), rel=1e-6)
        np.testing.assert_allclose(clip_maps(maps, signed=True)[i].numpy(), viz._normalize_attr(m, "all", 2),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(clip_maps(maps, signed=False)[i].numpy(),
                                   viz._normalize_attr(m, "absolute_value", 2), rtol=1e-5, atol=1e-7)


def test_overlays_and_colour_bars():
    images = torch.rand(2, 3, 8, 8)
    maps = torch.zeros(2, 4, 4)
    maps[:, 0, 0] = 5.0
    maps[1, 3, 3] = -5.0
    signed = heat_overlay(images, maps, signed=True)
    assert signed.shape == (2, 3, 8, 8) and 0 <= signed.min() and signed.max() <= 1
    # strong evidence for is red, against is blue; a zero map leaves the grey image
    assert signed[0, 0, 0, 0] > signed[0, 2, 0, 0] and signed[1, 2, -1, -1] > signed[1, 0, -1, -1]
    assert outlier_scale(torch.zeros(1, 3, 3)).item() == 1.0
    stops = colormap_stops("RdBu_r", 5)
    assert len(stops) == 5 and stops[2].startswith("#f") and all(len(s) == 7 for s in stops)
    with pytest.raises(ValueError, match="outlier_perc"):
        outlier_scale(maps, 100)


def test_grid_pages_and_the_figure_api(tmp_path):
    report = Report("t", "intro", {"a": 1})
    report.add("old figure", torch.rand(3, 4, 4), "caption <b>")
    rows = [Row(torch.rand(3, 4, 4), (f"true: {i}",), [torch.rand(3, 4, 4)]) for i in range(5)]
    report.add_grid("grid", [Column("m", "how to read m", "jet")], rows, page_size=2)
    report.add_table("table", ["x"], [[1]])
    html = report.write(tmp_path / "r.html").read_text()
    assert html.count("<tbody class='page'") == 3 and "data-page='1' hidden" in html and "data-page='0' hidden" not in html and "page 1 of 3" in html
    assert "caption &lt;b&gt;" in html and "how to read m" in html and "linear-gradient" in html
    assert html.count("data:image/png;base64,") == 1 + 5 * 2
    with pytest.raises(ValueError, match="expected 1 cells per row"):
        report.add_grid("bad", [Column("m")], [Row(torch.rand(3, 4, 4), (), [])])
