"""The preview montage of the export: each patient's mid-sagittal T2 with its boxes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from spinedet.demo.rendering import SeriesGeometry
from spinedet.demo.truth import PatientResult, case_name

def preview_slice(volume, geometry: SeriesGeometry, anatomy, lesions, boxes):
    """The slice with most lesion boxes (else the one nearest the midline), in display
    orientation (anterior left, superior up), with its boxes."""
    midline_distance = []
    for k in range(geometry.n_slices):
        centre = geometry.slice_points(k)[geometry.rows // 2, geometry.cols // 2]
        midline_distance.append(abs(centre[0] - anatomy.x_mid))
    box_count = np.zeros(geometry.n_slices)
    for _, k, _ in boxes:
        box_count[k] += 1
    k = int(np.lexsort((midline_distance, -box_count))[0])
    image = volume[k].astype(np.float32)
    flip_x = geometry.iop[1] < 0  # rows run posterior -> anterior
    flip_y = geometry.iop[5] > 0  # columns run inferior -> superior
    slice_boxes = []
    for lesion_index, kk, (x0, y0, x1, y1) in boxes:
        if kk != k:
            continue
        if flip_x:
            x0, x1 = geometry.cols - x1, geometry.cols - x0
        if flip_y:
            y0, y1 = geometry.rows - y1, geometry.rows - y0
        slice_boxes.append((lesions[lesion_index].label, (x0, y0, x1, y1)))
    if flip_x:
        image = image[:, ::-1]
    if flip_y:
        image = image[::-1, :]
    return image, slice_boxes




BOX_COLORS = ["#ff3030", "#30c0ff", "#ffd030"]


def write_preview(results: list[PatientResult], path: Path, max_patients: int = 8) -> None:
    """A montage of each patient's mid-sagittal T2 with its boxes (case names only, no PHI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = results[:max_patients]
    columns = min(4, len(shown))
    rows = int(np.ceil(len(shown) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.1 * rows), squeeze=False)
    colors = {}
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, result) in enumerate(zip(axes.flat, shown)):
        image = result.preview_image
        low, high = np.percentile(image, [1, 99.5])
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="bilinear")
        for label, (x0, y0, x1, y1) in result.preview_boxes:
            color = colors.setdefault(label, BOX_COLORS[len(colors) % len(BOX_COLORS)])
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1))
        ax.set_title(f"{case_name(index, len(results))}  {result.group}", fontsize=9)
    if colors:
        handles = [plt.Line2D([], [], color=c, label=l) for l, c in colors.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # A palette of grays plus the box colours keeps the PNG small; no text chunks are written.
    box_colors = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in BOX_COLORS]
    grays = [(v, v, v) for v in np.linspace(0, 255, 256 - len(box_colors)).astype(int)]
    palette = Image.new("P", (1, 1))
    palette.putpalette([channel for color in grays + box_colors for channel in color])
    image = Image.open(buffer).convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
