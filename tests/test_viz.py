import pytest
import torch

from cnnviz_fast.viz import colorize, image_grid, overlay, save_image


def test_overlay_blends_colour_over_image():
    images = torch.zeros(2, 3, 4, 5)
    heat = torch.zeros(2, 4, 5)
    heat[1, 2, 3] = 1.0
    out = overlay(images, heat, alpha=0.5)
    assert out.shape == (2, 3, 4, 5)
    # jet at 1.0 is dark red: red channel high, blue low
    assert out[1, 0, 2, 3] > 0.2 and out[1, 2, 2, 3] < 0.05
    torch.testing.assert_close(out, 0.5 * colorize(heat))


def test_grid_layout():
    imgs = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    g = image_grid(imgs, nrow=2, padding=1, pad_value=9)
    assert g.shape == (3, 1 + 2 * 3, 1 + 2 * 3)
    assert g[0, 1, 1] == 0 and g[0, 1, 4] == 1 and g[0, 4, 1] == 2 and g[0, 4, 4] == 9


def test_save_image_is_atomic_png(tmp_path):
    from PIL import Image
    p = save_image(torch.rand(3, 6, 7), tmp_path / "sub" / "a.png")
    assert Image.open(p).size == (7, 6)
    assert [f.name for f in p.parent.iterdir()] == ["a.png"]


@pytest.mark.parametrize("kw, match", [
    (dict(images=torch.rand(1, 3, 4, 4), heatmaps=torch.rand(1, 5, 4)), "heatmaps: expected"),
    (dict(images=torch.rand(1, 3, 4, 4), heatmaps=torch.rand(1, 4, 4), alpha=2), "alpha"),
    (dict(images=torch.rand(3, 4, 4), heatmaps=torch.rand(1, 4, 4)), "images: expected a 4-D"),
])
def test_bad_input(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        overlay(**kw)
