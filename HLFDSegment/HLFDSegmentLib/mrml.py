"""MRML side of the extension: the only Lib module that imports ``slicer``.

Volume node <-> SimpleITK image (LPS, oblique directions kept), labels -> segmentation node
(names, colours, SNOMED CT terminology, reference geometry), subject hierarchy, 3D display,
volume table, and :class:`SegmentationRun`, the whole "Segment" flow around a worker job.
Only MRML classes and static logic methods are used, so everything here runs both in 3D Slicer
and headless with the ``slicer-core`` wheel (``slicer.util.loadVolume`` & co. are avoided).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError
from .segfile import terminology_tag
from .slicerjob import JobState, Launcher, SegmentationJob, popen_launcher, volume_rows

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
_CONVERTER_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


@contextlib.contextmanager
def converters() -> Iterator[None]:
    """Segmentation conversion rules available inside the block. Slicer registers them at
    start-up (then this does nothing); headless, they are registered only for the block, since
    a registered rule adds its parameters to every segmentation created afterwards. A
    segmentation takes its rules when it is created: create nodes inside the block."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        yield
        return
    rules = [getattr(slicer, name)() for name in _CONVERTER_RULES]
    for rule in rules:
        factory.RegisterConverterRule(rule)
    try:
        yield
    finally:
        for rule in rules:
            factory.UnregisterConverterRule(rule)


def _scene_of(node: Any) -> Any:
    scene = node.GetScene()
    if scene is None:
        raise ValueError(f"node {node.GetName()!r} is not in a scene")
    return scene


# -- volumes -------------------------------------------------------------------------------------


def volume_to_image(node: Any) -> sitk.Image:
    """The voxels of a scalar volume node as a SimpleITK image in LPS (copy, geometry kept).

    A vector (multi-component) volume becomes a vector image, so the runtime's input checks
    can refuse it with a clear message. The node's parent transform is not applied."""
    data = node.GetImageData() if node is not None else None
    if data is None or data.GetPointData().GetScalars() is None:
        raise InputError(f"volume {getattr(node, 'GetName', lambda: '?')()!r} holds no voxels")
    dims = data.GetDimensions()
    components = data.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    image = sitk.GetImageFromArray(array.reshape(shape).copy(), isVector=components > 1)
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    ras = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    image.SetSpacing(tuple(float(s) for s in node.GetSpacing()))
    image.SetOrigin(tuple((_RAS_FROM_LPS @ np.asarray(node.GetOrigin(), dtype=float)).tolist()))
    image.SetDirection(tuple((_RAS_FROM_LPS @ ras).ravel().tolist()))
    return image


def set_geometry(node: Any, image: sitk.Image) -> None:
    """Give ``node`` the spacing, origin and direction of ``image`` (LPS -> RAS)."""
    lps = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    node.SetSpacing(*image.GetSpacing())
    node.SetOrigin(*(_RAS_FROM_LPS @ np.asarray(image.GetOrigin(), dtype=float)).tolist())
    node.SetIJKToRASDirections((_RAS_FROM_LPS @ lps).tolist())


def image_to_volume_node(
    image: sitk.Image,
    scene: Any,
    name: str = "Volume",
    class_name: str = "vtkMRMLScalarVolumeNode",
    node: Any = None,
) -> Any:
    """A scalar (or labelmap, with ``class_name``) volume node holding a copy of ``image``."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: only 3D scalar images can become volume nodes")
    array = sitk.GetArrayFromImage(image)
    data = vtk.vtkImageData()
    data.SetDimensions(*image.GetSize())
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    data.GetPointData().SetScalars(vtk_array)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    set_geometry(node, image)
    node.SetAndObserveImageData(data)
    return node


def volume_geometry(node: Any) -> tuple[tuple[int, ...], np.ndarray]:
    """(size, 4x4 IJK-to-RAS) of a volume node."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return tuple(node.GetImageData().GetDimensions()), ijk_to_ras


def _same_grid(image: sitk.Image, node: Any) -> bool:
    size, ijk_to_ras = volume_geometry(node)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return tuple(image.GetSize()) == size and np.allclose(ras, ijk_to_ras, atol=1e-4)


# -- segmentation --------------------------------------------------------------------------------


def labels_to_segmentation(
    labels: sitk.Image,
    entries: Sequence[Mapping[str, Any]],
    reference: Any,
    segmentation: Any = None,
    name: str | None = None,
) -> Any:
    """Put a uint8 labelmap on the grid of volume node ``reference`` into a segmentation node.

    One segment per label entry (card order; empty ones kept) with the card's name, colour and
    terminology (neither flagged as auto-generated); the reference geometry is the input's.
    ``segmentation`` (an existing node) is changed only once everything else has succeeded (an
    error leaves it as it was), and only in the segments this model makes (same names): the
    segments a user drew stay. Returns the segmentation node."""
    scene = _scene_of(reference)
    if labels.GetDimension() != 3 or labels.GetPixelID() != sitk.sitkUInt8:
        raise InputError("labels must be a 3D uint8 image")
    if not _same_grid(labels, reference):
        raise InputError(f"labels are not on the grid of volume {reference.GetName()!r}")
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=256)
    known = {int(e["value"]) for e in entries}
    unknown = sorted(set(np.flatnonzero(counts[1:]) + 1) - known)
    if unknown:
        raise InputError(f"label values {unknown} have no entry in the model card")
    tags = [terminology_tag(e) for e in entries]  # validates every entry before any change

    with converters():  # nodes created here can convert (e.g. to closed surface) later
        temp_labels = image_to_volume_node(
            labels, scene, "HLFD temp labels", "vtkMRMLLabelMapVolumeNode"
        )
        temp = slicer.vtkMRMLSegmentationNode()
        temp.SetScene(scene)
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                temp_labels, temp
            )
            if not ok:
                raise RuntimeError("importing the labelmap into a segmentation failed")
            seg = temp.GetSegmentation()
            by_value = {}
            for i in range(seg.GetNumberOfSegments()):
                by_value[seg.GetNthSegment(i).GetLabelValue()] = seg.GetNthSegmentID(i)
            ordered = []
            for entry in entries:
                value = int(entry["value"])
                segment_id = by_value.get(value)
                if segment_id is None:  # label absent from this volume: keep an empty segment
                    segment_id = _add_empty_segment(seg, f"label_{value}", entry["name"])
                ordered.append(segment_id)
            for index, segment_id in enumerate(ordered):  # card order
                seg.SetSegmentIndex(segment_id, index)

            if segmentation is None:
                segmentation = scene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", name or f"{reference.GetName()} segmentation"
                )
            elif name:
                segmentation.SetName(name)
            target = segmentation.GetSegmentation()
            if target.GetNumberOfSegments() == 0:
                target.DeepCopy(seg)
            else:  # replace only this model's segments (by name); the user's others stay
                ordered = _replace_segments(target, seg, ordered, entries)
            for segment_id, entry, tag in zip(ordered, entries, tags):
                segment = target.GetSegment(segment_id)
                segment.SetName(entry["name"])
                segment.SetColor(*(c / 255.0 for c in entry["color"]))
                segment.SetNameAutoGenerated(False)
                segment.SetColorAutoGenerated(False)
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        finally:
            scene.RemoveNode(temp_labels)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    return segmentation


def _replace_segments(target: Any, source: Any, ids: list[str], entries) -> list[str]:
    """Remove ``target``'s segments named like the model's labels, then add copies of
    ``source``'s segments ``ids`` under fresh unique ids; returns those ids (card order)."""
    names = {str(e["name"]) for e in entries}
    for i in reversed(range(target.GetNumberOfSegments())):
        if target.GetNthSegment(i).GetName() in names:
            target.RemoveSegment(target.GetNthSegmentID(i))
    added = []
    for segment_id, entry in zip(ids, entries):
        copy = slicer.vtkSegment()
        copy.DeepCopy(source.GetSegment(segment_id))
        new_id = target.GenerateUniqueSegmentID(str(entry["name"]).replace(" ", "_"))
        if not target.AddSegment(copy, new_id):
            raise RuntimeError(f"cannot add segment {entry['name']!r}")
        added.append(new_id)
    return added


def _add_empty_segment(seg: Any, segment_id: str, name: str) -> str:
    """Add a segment with an empty binary labelmap (no conversion rule needed)."""
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
        slicer.vtkOrientedImageData(),
    )
    if not seg.AddSegment(segment, segment_id):
        raise RuntimeError(f"cannot add segment {name!r}")
    return segment_id


def segment_ids(segmentation: Any) -> list[str]:
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def volume_to_image_array(node: Any) -> np.ndarray:
    """A copy of a volume node's voxels as a (z, y, x) array."""
    return sitk.GetArrayFromImage(volume_to_image(node))


def place_under_study(node: Any, reference: Any) -> None:
    """Put ``node`` beside ``reference`` in the subject hierarchy (its study, if any)."""
    scene = _scene_of(reference)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    invalid = sh.GetInvalidItemID()
    ref_item = sh.GetItemByDataNode(reference)
    if ref_item == invalid:
        return
    parent = sh.GetItemParent(ref_item)
    item = sh.GetItemByDataNode(node)
    if item == invalid:
        sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)


def show_in_3d(segmentation: Any, visible: bool = True) -> None:
    """Create (or drop) the closed-surface representation and set 3D visibility."""
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    if visible:
        with converters():
            segmentation.CreateClosedSurfaceRepresentation()
    segmentation.GetDisplayNode().SetVisibility3D(visible)


VOLUME_COLUMNS = ("Segment", "Volume [mL]", "Voxels", "Tumor burden [%]")
VOLUMES_TABLE_ROLE = "HLFDSegmentVolumesTable"
"""Node reference role from a segmentation to its volume table (saved with the scene)."""


def volumes_table_of(segmentation: Any) -> Any:
    """The volume table made for ``segmentation`` by an earlier run (None if none)."""
    return segmentation.GetNodeReference(VOLUMES_TABLE_ROLE) if segmentation else None


def volumes_table(
    volumes: Sequence[Mapping[str, Any]],
    labels: Sequence[Mapping[str, Any]],
    scene: Any,
    table: Any = None,
    name: str = "Segment volumes",
) -> Any:
    """A table node (``table`` is refilled in place): segment name, volume (mL), voxels, tumour
    burden (lesion / organ %, two decimals; empty where it does not apply, never "nan")."""
    rows = volume_rows(volumes, labels)
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    vtable = vtk.vtkTable()
    columns = [vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray(), vtk.vtkStringArray()]
    for column, title in zip(columns, VOLUME_COLUMNS):
        column.SetName(title)
        vtable.AddColumn(column)
    for row in rows:
        columns[0].InsertNextValue(row["name"])
        columns[1].InsertNextValue(round(row["volume_ml"], 3))
        columns[2].InsertNextValue(row["voxels"])
        burden = row["burden_percent"]
        columns[3].InsertNextValue("" if burden is None else f"{burden:.2f}")
    table.SetAndObserveTable(vtable)
    table.SetUseColumnTitleAsColumnHeader(True)
    return table


# -- the whole flow ------------------------------------------------------------------------------


class SegmentationRun:
    """Segment one volume node in a worker subprocess and put the result into the scene.

    :meth:`start` writes the volume and launches the worker; call :meth:`poll` (QTimer or
    :meth:`wait`) until :attr:`finished`; if the job is DONE, :meth:`apply` creates or fills
    the segmentation node and the volume table. Nothing in the scene changes before
    :meth:`apply`, so a failure or :meth:`cancel` leaves the scene as it was."""

    def __init__(
        self,
        volume: Any,
        model: str | os.PathLike[str],
        device: str = "auto",
        tta: bool = False,
        *,
        segmentation: Any = None,
        python: str | os.PathLike[str] | None = None,
        launcher: Launcher = popen_launcher,
        threads: int | None = None,
        command: Callable[[list[str]], list[str]] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ):
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("select a CT volume (a scalar volume node) to segment")
        if volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{volume.GetName()!r} is a labelmap, not a CT volume")
        self.volume = volume
        self.segmentation = segmentation
        self.job = SegmentationJob(
            model,
            device,
            tta,
            python=python,
            launcher=launcher,
            threads=threads,
            command=command,
            log_dir=log_dir,
        )
        self.table: Any = None

    @property
    def finished(self) -> bool:
        return self.job.finished

    def start(self) -> None:
        try:
            sitk.WriteImage(volume_to_image(self.volume), str(self.job.input_path), False)
            self.job.start()
        except BaseException:
            self.job.cleanup()
            raise

    def poll(self) -> list[dict[str, Any]]:
        return self.job.poll()

    def wait(self, timeout: float | None = None, on_events=None) -> JobState:
        return self.job.wait(timeout, on_events=on_events)

    def cancel(self) -> None:
        self.job.cancel()

    def apply(self, show_3d: bool = False) -> Any:
        """Load the worker's labels into the scene; returns the segmentation node."""
        if self.job.state is not JobState.DONE or self.job.result is None:
            raise RuntimeError(self.job.error or f"segmentation {self.job.state.value}")
        try:
            result = self.job.result
            labels = sitk.ReadImage(str(self.job.output_path))
            labels = sitk.Cast(labels, sitk.sitkUInt8)
            self.segmentation, self.table = store_result(
                self.volume,
                labels,
                result["labels"],
                result["report"]["segments"],
                self.segmentation,
                show_3d,
            )
            return self.segmentation
        finally:
            self.job.cleanup()


def store_result(
    volume: Any,
    labels: sitk.Image,
    entries: Sequence[Mapping[str, Any]],
    volumes: Sequence[Mapping[str, Any]],
    segmentation: Any = None,
    show_3d: bool = False,
) -> tuple[Any, Any]:
    """Put a labelmap on ``volume``'s grid into ``segmentation`` (new if None) and its volumes
    into the segmentation's own table, found by node reference (not by name) and refilled in
    place on a rerun: one table per segmentation. Returns (segmentation, table)."""
    segmentation = labels_to_segmentation(labels, entries, volume, segmentation)
    place_under_study(segmentation, volume)
    show_in_3d(segmentation, show_3d)
    table = volumes_table(
        volumes,
        entries,
        _scene_of(volume),
        volumes_table_of(segmentation),
        f"{volume.GetName()} segment volumes",
    )
    segmentation.SetNodeReferenceID(VOLUMES_TABLE_ROLE, table.GetID())
    place_under_study(table, volume)
    return segmentation, table


def segment_volume(
    volume: Any,
    model: str | os.PathLike[str],
    device: str = "auto",
    tta: bool = False,
    *,
    segmentation: Any = None,
    show_3d: bool = False,
    python: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    on_events: Callable[..., None] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> SegmentationRun:
    """The whole flow, waiting: write the volume, run the worker, put the result into the scene.

    Returns the applied run (``.segmentation``, ``.table``); raises RuntimeError with the
    worker's message on failure (the scene is then unchanged), TimeoutError after ``timeout``."""
    run = SegmentationRun(
        volume, model, device, tta, segmentation=segmentation, python=python, log_dir=log_dir
    )
    run.start()
    state = run.wait(timeout, on_events=on_events)
    if state is not JobState.DONE:
        run.cancel()
        raise RuntimeError(run.job.error or f"Segmentation {state.value}.")
    run.apply(show_3d=show_3d)
    return run


def result_problems(
    segmentation: Any, table: Any, entries: Sequence[Mapping[str, Any]]
) -> list[str]:
    """What is wrong with a finished result (empty list: nothing): every label of the card is a
    named, coded segment; the organs are not empty; the segmentation's own table lists every
    segment with a finite volume and no "nan"."""
    problems = []
    seg = segmentation.GetSegmentation()
    segments = {
        seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i)
        for i in range(seg.GetNumberOfSegments())
    }
    for entry in entries:
        segment = segments.get(entry["name"])
        if segment is None:
            problems.append(f"segment {entry['name']!r} missing")
        elif not segment.GetTerminology():
            problems.append(f"segment {entry['name']!r} has no terminology")
    if volumes_table_of(segmentation) is not table:
        problems.append("the table is not the segmentation's own volume table")
        return problems
    rows = {
        table.GetCellText(r, 0): [
            table.GetCellText(r, c) for c in range(1, table.GetNumberOfColumns())
        ]
        for r in range(table.GetNumberOfRows())
    }
    for entry in entries:
        row = rows.get(entry["name"])
        if row is None:
            problems.append(f"table has no row for {entry['name']!r}")
            continue
        if any(cell.lower() == "nan" for cell in row):
            problems.append(f"table row {entry['name']!r} shows nan")
        volume_ml = float(row[0])
        if not math.isfinite(volume_ml) or volume_ml < 0:
            problems.append(f"table row {entry['name']!r}: volume {row[0]}")
        elif entry.get("inside") is None and volume_ml == 0:
            problems.append(f"organ {entry['name']!r} is empty")
    return problems
