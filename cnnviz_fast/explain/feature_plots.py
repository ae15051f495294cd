"""Pictures of a feature space: 2-D maps (colours or thumbnails) and nearest-neighbour grids.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no global state),
so they work under any backend; save them with ``fig.savefig(path)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ..viz import image_grid


def _thumbnail_canvas(points, images, grid, thumb, frames, frame_width):
    """Karpathy's t-SNE grid view: the map cut into ``grid x grid`` cells, each showing the
    image of the point nearest its centre (cells without points stay white)."""
    lo, hi = points.min(0).values, points.max(0).values
    unit = (points - lo) / (hi - lo).clamp_min(1e-12)
    cell = (unit * grid).long().clamp(0, grid - 1)
    gap = (unit - (cell.float() + 0.5) / grid).square().sum(1)
    flat = cell[:, 1] * grid + cell[:, 0]
    n = points.shape[0]
    best = torch.full((grid * grid,), float("inf")).scatter_reduce(0, flat, gap, "amin")
    nearest = (gap == best[flat]).nonzero()[:, 0]
    winner = torch.full((grid * grid,), n).scatter_reduce(0, flat[nearest], nearest, "amin")  # ties: lowest index
    chosen = winner[winner < n]
    w = frame_width if frames is not None else 0
    inner = F.interpolate(images[chosen].float(), size=(thumb - 2 * w, thumb - 2 * w), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0, 1).expand(-1, 3, -1, -1)
    small = torch.ones(len(chosen), 3, thumb, thumb)
    if w:
        small[:] = frames[chosen][:, :, None, None]
    small[:, :, w:thumb - w, w:thumb - w] = inner
    cells = torch.ones(grid * grid, 3, thumb, thumb)
    cells[(grid - 1 - cell[chosen, 1]) * grid + cell[chosen, 0]] = small   # map y points up, canvas rows down
    return image_grid(cells, nrow=grid, padding=0)


def embedding_plot(points: torch.Tensor, images: torch.Tensor | None = None, labels=None,
                   class_names=None, grid: int = 32, thumb: int = 24, title: str | None = None,
                   figsize=(8, 8), cmap: str = "tab10"):
    """A 2-D map of a feature space (from ``pca`` or ``tsne``) as a matplotlib Figure.

    points: float ``[N, 2]``. Without images, a scatter coloured by ``labels`` (int ``[N]``,
    with a legend of ``class_names`` when given). With images ``[N, C, h, w]`` in [0, 1]
    (C = 1 or 3), the t-SNE grid-of-thumbnails view: the map is cut into ``grid x grid``
    cells and each shows the ``thumb``-pixel thumbnail of the point nearest its centre,
    framed in its label's colour when labels are given.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    check_tensor("points", points, ndim=2)
    if points.shape[1] != 2:
        raise ValueError(f"points: expected [N, 2], got shape {tuple(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points: holds NaN or infinite values")
    n = points.shape[0]
    pts = points.detach().float().cpu()
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(f"labels: expected {n} integer labels, got shape {tuple(labels.shape)} "
                             f"of {labels.dtype}")
    if cmap not in colormaps:
        raise ValueError(f"cmap: unknown matplotlib colormap {cmap!r}")
    palette = colormaps[cmap]
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    if images is not None:
        check_tensor("images", images, ndim=4)
        if images.shape[0] != n or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected [{n}, 1 or 3, h, w] for {n} points, got {tuple(images.shape)}")
        if grid < 1 or thumb < 4:
            raise ValueError(f"grid, thumb: expected grid >= 1 and thumb >= 4, got {grid}, {thumb}")
        frames = None
        if labels is not None:
            frames = torch.tensor([palette(int(v) % palette.N)[:3] for v in labels.tolist()], dtype=torch.float32)
        canvas = _thumbnail_canvas(pts, images.detach().cpu(), grid, thumb, frames, max(1, thumb // 12))
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
    else:
        if labels is None:
            ax.scatter(pts[:, 0], pts[:, 1], s=6)
        else:
            for value in torch.unique(labels).tolist():
                sel = labels == value
                name = class_names[value] if class_names is not None and 0 <= value < len(class_names) else str(value)
                ax.scatter(pts[sel, 0], pts[sel, 1], s=6, color=palette(value % palette.N), label=name)
            ax.legend(markerscale=3, fontsize="small", loc="best")
        ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def neighbours_grid(query_images: torch.Tensor, neighbour_images: torch.Tensor, padding: int = 2,
                    separator: int = 6) -> torch.Tensor:
    """One row per query: the query image, a gap of ``separator`` pixels, then its k neighbours.

    query_images ``[Q, C, h, w]``, neighbour_images ``[Q, k, C, h, w]`` (e.g. the dataset
    images at ``FeatureIndex.search`` ids), values in [0, 1]. Returns ``[C, H, W]`` float32
    on the images' device, for ``cnnviz_fast.viz.save_image``.
    """
    check_tensor("query_images", query_images, ndim=4)
    check_tensor("neighbour_images", neighbour_images, ndim=5)
    k = neighbour_images.shape[1]
    if neighbour_images.shape[0] != query_images.shape[0] or neighbour_images.shape[2:] != query_images.shape[1:]:
        raise ValueError(f"neighbour_images: expected [Q, k, C, h, w] matching query_images "
                         f"{tuple(query_images.shape)}, got {tuple(neighbour_images.shape)}")
    if padding < 0 or separator < 0:
        raise ValueError(f"padding, separator: expected ints >= 0, got {padding}, {separator}")
    queries = image_grid(query_images.float(), nrow=1, padding=padding)
    neighbours = image_grid(neighbour_images.flatten(0, 1).float(), nrow=k, padding=padding)
    gap = queries.new_ones(queries.shape[0], queries.shape[1], separator)
    return torch.cat([queries, gap, neighbours], dim=2)
