"""The Extension Manager screenshot, rendered (not captured from Slicer): a synthetic CT
segmented by a built-in model, an axial slice with the segments in the card's colours beside a
3D surface view, as the module shows them.

    python -m hlfd_train.screenshot [Resources/Screenshots/HLFDSegment-1.png] [--model liver]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "HLFDSegment-1.png"


def _surface(mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(vertices mm, triangles) of a binary mask's boundary (VTK flying edges + decimation)."""
    import vtk
    from vtk.util import numpy_support

    data = vtk.vtkImageData()
    data.SetDimensions(*mask.shape[::-1])
    data.SetSpacing(*spacing)
    flat = np.ascontiguousarray(mask.astype(np.uint8)).ravel()
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    edges = vtk.vtkDiscreteFlyingEdges3D()
    edges.SetInputData(data)
    edges.SetValue(0, 1)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(edges.GetOutputPort())
    smooth.SetNumberOfIterations(15)
    decimate = vtk.vtkQuadricDecimation()
    decimate.SetInputConnection(smooth.GetOutputPort())
    decimate.SetTargetReduction(0.9)
    decimate.Update()
    poly = decimate.GetOutput()
    points = numpy_support.vtk_to_numpy(poly.GetPoints().GetData())
    cells = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points, cells


def render(out: Path, model: str = "liver", seed: int = 3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from HLFDSegmentLib.model_registry import resolve_model
    from HLFDSegmentLib.modelpackage import load_package
    from HLFDSegmentLib.pipeline import Segmenter

    from .synth import SynthConfig, synth_case

    package = load_package(resolve_model(model))
    cfg = SynthConfig(task=package.card["task"], fov_cut=0.0, phases={"portal_venous": 1.0})
    case = synth_case(cfg, seed)
    image, _ = case.to_sitk()
    labels = sitk.GetArrayFromImage(Segmenter(package, device="cpu")(image).labels)
    ct = case.image
    z = int(np.argmax((labels == 2).sum((1, 2)))) if (labels == 2).any() else ct.shape[0] // 2
    colours = {e["value"]: np.array(e["color"]) / 255 for e in package.labels}
    fig = plt.figure(figsize=(12, 6), facecolor="black")
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(ct[z], cmap="gray", vmin=-160, vmax=240)
    overlay = np.zeros((*ct.shape[1:], 4))
    for value, colour in colours.items():
        overlay[labels[z] == value] = (*colour, 0.55)
    ax.imshow(overlay)
    ax.set_title(f"{package.card.get('title', package.name)}: axial", color="white")
    ax.axis("off")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d", facecolor="black")
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for value, colour in colours.items():
        if not (labels == value).any():
            continue
        points, cells = _surface(labels == value, case.spacing)
        lo, hi = np.minimum(lo, points.min(0)), np.maximum(hi, points.max(0))
        mesh = Poly3DCollection(points[cells], alpha=0.9 if value == 2 else 0.45)
        mesh.set_facecolor(colour)
        mesh.set_edgecolor("none")
        ax3.add_collection3d(mesh)
    if np.isfinite(lo).all():  # zoom on the segments, true proportions
        ax3.set_xlim(lo[0], hi[0])
        ax3.set_ylim(hi[1], lo[1])
        ax3.set_zlim(lo[2], hi[2])
        ax3.set_box_aspect(np.maximum(hi - lo, 1.0))
    ax3.view_init(elev=15, azim=-60)
    ax3.set_axis_off()
    ax3.set_title("3D (closed surfaces)", color="white")
    fig.text(
        0.5,
        0.02,
        "Rendered from a synthetic CT segmented by the built-in student (not a screen capture)",
        color="0.7",
        ha="center",
        fontsize=9,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--model", default="liver")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    print(render(args.out, args.model, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
