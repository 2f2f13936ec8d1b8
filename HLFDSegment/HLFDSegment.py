"""HLFD Segment: kidney / liver tumour segmentation on CT in 3D Slicer (thin Qt layer).

Everything that can run without the Slicer application lives in HLFDSegmentLib (tested headless
with slicer-core): the worker subprocess and its job runner (slicerjob), MRML conversions and
the whole segment flow (mrml), dependency installation (deps) and sample data (samples).
"""

import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# This file stays loadable by Python 3.9 (Slicer 5.8) so that an older Slicer shows one clear
# message instead of a traceback; HLFDSegmentLib and the worker need Python 3.10+ (checked in CI).
MINIMUM_SLICER = "5.10"
MINIMUM_PYTHON = (3, 10)
SUPPORTED = sys.version_info >= MINIMUM_PYTHON
UNSUPPORTED_MESSAGE = (
    "HLFD Segment needs 3D Slicer {slicer} or later (Python {need} or later); this Slicer runs "
    "Python {have}. Please install a newer 3D Slicer."
)

if SUPPORTED:
    from HLFDSegmentLib import deps, samples, slicerjob
    from HLFDSegmentLib.mrml import SegmentationRun


def unsupportedMessage() -> str:
    """The one line an older Slicer shows (empty where this Slicer is supported)."""
    if SUPPORTED:
        return ""
    return _(UNSUPPORTED_MESSAGE).format(
        slicer=MINIMUM_SLICER,
        need=".".join(map(str, MINIMUM_PYTHON)),
        have=f"{sys.version_info.major}.{sys.version_info.minor}",
    )


CITATION = (
    "Rethinking Intermediate Layers design in Knowledge Distillation for Kidney and Liver Tumor "
    "Segmentation. IEEE International Symposium on Biomedical Imaging (ISBI), 2024."
)
STAGE_NAMES = {
    "read": "Reading the volume",
    "model": "Loading the model",
    "preprocess": "Preprocessing",
    "infer": "Running the network",
    "postprocess": "Postprocessing",
    "resample": "Resampling to the CT grid",
    "write": "Writing the result",
}


#
# HLFDSegment
#


class HLFDSegment(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("HLFD Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["HLFDSegment contributors"]
        self.parent.helpText = _(
            "Fully automatic segmentation of the kidneys and kidney tumours, or of the liver and "
            "liver tumours, on CT, with compact student networks trained by Hierarchical "
            "Layer-selective Feedback Distillation (HLFD). Select a CT volume and a model, then "
            "click Segment. The result is a segmentation with SNOMED CT coded segments and a "
            "table of segment volumes and tumour burden. Research use only; not for diagnosis."
            '<p>See the <a href="https://github.com/hlfdsegment/SlicerHLFDSegment">project '
            "page</a> for models, scripting and training.</p>"
        )
        self.parent.acknowledgementText = _(
            "If you use this extension, please cite the HLFD paper: {citation} "
            "Inference uses PyTorch and MONAI."
        ).format(citation=CITATION)
        if not SUPPORTED:
            self.parent.helpText = f"<p><b>{unsupportedMessage()}</b></p>" + self.parent.helpText
            return
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Phantom kidney and liver CTs in the Sample Data module (generated on first use)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    folder = os.path.join(slicer.app.cachePath, "HLFDSegment")
    for task, title in (("kidney", _("Phantom kidney CT")), ("liver", _("Phantom liver CT"))):
        nodeName = samples.SAMPLES[task][0]
        path = os.path.join(folder, f"{nodeName}.nrrd")

        def load(source=None, task=task, nodeName=nodeName) -> Any:
            with slicer.util.tryWithErrorDisplay(_("Cannot create the phantom CT."), True):
                return slicer.util.loadVolume(
                    str(samples.sample_ct(task, folder)), {"name": nodeName}
                )

        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="HLFD Segment",
            sampleName=nodeName,
            uris=[qt.QUrl.fromLocalFile(path).toString()],
            fileNames=[f"{nodeName}.nrrd"],
            nodeNames=[nodeName],
            thumbnailFileName=os.path.join(iconsPath, "HLFDSegment.png"),
            customDownloader=load,
        )
        logging.debug("registered sample %s (%s)", nodeName, title)


#
# Parameter node
#


@parameterNodeWrapper
class HLFDSegmentParameterNode:
    """What the module remembers in the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: str = "auto"
    tta: bool = False
    show3D: bool = True


#
# Widget
#


class HLFDSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, Segment/Cancel, progress and results. Logic does the work."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: SegmentationRun | None = None
        self._extraModels: list[str] = []
        self._lastInput = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if not SUPPORTED:  # an older Slicer: say so in the panel, build nothing else
            label = qt.QLabel(unsupportedMessage())
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            logging.warning(unsupportedMessage())
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HLFDSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HLFDSegmentLogic()

        for choice, text in zip(slicerjob.DEVICE_CHOICES, (_("Auto"), _("GPU"), _("CPU"))):
            self.ui.deviceComboBox.addItem(text, choice)
        self.ui.detectedDeviceLabel.text = _("Detected: {device}").format(
            device=self.logic.detectedDevice()
        )
        self.ui.progressBar.visible = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopRun()
        self.removeObservers()

    def _stopRun(self) -> None:
        """Stop polling and kill the worker, if one runs."""
        self._timer.stop()
        if self._run is not None:
            self._run.cancel()
            self._run = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply
            )

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first
        if not self._parameterNode.model and self.ui.modelComboBox.count:
            self._parameterNode.model = self.ui.modelComboBox.itemData(0) or ""

    def setParameterNode(self, inputParameterNode: Optional[HLFDSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable Segment when a CT and a model are chosen (always enabled as Cancel)."""
        self._resetOutputOnNewInput()
        self._syncComboBoxes()
        if self._run is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left unchanged.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Segment")
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        ready = ready and bool(self._parameterNode.model)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            _("Segment the selected CT volume") if ready else _("Select a CT volume and a model")
        )

    def _resetOutputOnNewInput(self) -> None:
        """Another CT was picked: its result goes to a new segmentation, never into the previous
        patient's (possibly hand-corrected) one."""
        p = self._parameterNode
        if not p or p.inputVolume is self._lastInput:
            return
        changed = self._lastInput is not None
        self._lastInput = p.inputVolume
        if changed and p.outputSegmentation is not None:
            p.outputSegmentation = None

    def _syncComboBoxes(self) -> None:
        if not self._parameterNode:
            return
        for combo, value in (
            (self.ui.modelComboBox, self._parameterNode.model),
            (self.ui.deviceComboBox, self._parameterNode.device),
        ):
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)

    # -- models ---------------------------------------------------------------------------------
    def refreshModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for title, spec in self.logic.modelChoices(self._extraModels):
            combo.addItem(title, spec)
        combo.blockSignals(wasBlocked)
        self._syncComboBoxes()

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onLoadModel(self) -> None:
        """Pick a model package .zip (or, after cancelling, a package folder)."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Model package (.zip)"), "", _("Model package (*.zip)")
        )
        if not path:
            path = qt.QFileDialog.getExistingDirectory(
                slicer.util.mainWindow(), _("Model package folder (holding model.json)")
            )
        if not path:
            return
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model.json")):
            slicer.util.errorDisplay(_("{path} holds no model.json.").format(path=path))
            return
        if path not in self._extraModels:
            self._extraModels.append(path)
        self.refreshModels()
        self._parameterNode.model = path

    # -- run ------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._run is not None:
            self.onCancel()
            return
        with slicer.util.tryWithErrorDisplay(
            _("Failed to start the segmentation."), waitCursor=True
        ):
            p = self._parameterNode
            existing = p.outputSegmentation
            if (
                existing
                and existing.GetSegmentation().GetNumberOfSegments()
                and not slicer.util.confirmOkCancelDisplay(
                    _(
                        "Replace this model's segments in {name}? Segments you drew are kept."
                    ).format(name=existing.GetName())
                )
            ):
                return
            if not self.logic.installDependencies(askConfirmation=True):
                return
            self.ui.detectedDeviceLabel.text = _("Detected: {device}").format(
                device=self.logic.detectedDevice()
            )
            self._run = self.logic.start(
                p.inputVolume, p.model, p.device, p.tta, p.outputSegmentation
            )
            self.ui.progressBar.visible = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self.ui.timeLabel.text = ""
            self._timer.start()
        self._checkCanApply()

    def onCancel(self) -> None:
        self._stopRun()
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
        self._checkCanApply()

    def onTimer(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()
        job = run.job
        self.ui.progressBar.value = round(100 * job.fraction)
        stage = STAGE_NAMES.get(job.stage, job.stage)
        self.ui.statusLabel.text = _("{stage}... {percent}%").format(
            stage=_(stage) if stage else _("Starting"), percent=int(100 * job.fraction)
        )
        text = _("Elapsed {seconds:.0f} s").format(seconds=job.elapsed)
        if job.device_info:
            estimate = slicerjob.estimate_seconds(
                job.device_info.get("runtimes"), job.device_info.get("device", "cpu")
            )
            text += _(" on {device}").format(device=job.device_info.get("device"))
            if estimate is not None:
                text += _(" (measured for this model: about {seconds:.0f} s)").format(
                    seconds=estimate
                )
        self.ui.timeLabel.text = text
        if not run.finished:
            return
        self._timer.stop()
        self._run = None
        self.ui.progressBar.visible = False
        try:  # tryWithErrorDisplay shows the error, then re-raises it
            if job.state is slicerjob.JobState.DONE:
                self.ui.statusLabel.text = _("Failed to load the segmentation.")
                with slicer.util.tryWithErrorDisplay(_("Failed to load the segmentation."), True):
                    segmentation = self.logic.finish(run, self._parameterNode.show3D)
                    self._parameterNode.outputSegmentation = segmentation
                    self.ui.volumesTableView.setMRMLTableNode(run.table)
                    self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(
                        seconds=job.elapsed
                    )
                    for warning in job.warnings:
                        logging.warning(warning)
            else:
                run.cancel()  # removes the work folder
                self.ui.statusLabel.text = _("Segmentation failed.")
                slicer.util.errorDisplay(job.error or _("Segmentation failed."))
        finally:
            self._checkCanApply()


#
# Logic
#


class HLFDSegmentLogic(ScriptedLoadableModuleLogic):
    """Scripting facade: ``HLFDSegmentLogic().segment(volumeNode, model=..., device=...)``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> HLFDSegmentParameterNode:
        return HLFDSegmentParameterNode(super().getParameterNode())

    # -- environment ----------------------------------------------------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer: Slicer's Python without the application, for the worker."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        suffix = ".exe" if os.name == "nt" else ""
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + suffix)
        if os.path.isfile(candidate):
            return candidate
        raise RuntimeError(_("PythonSlicer executable not found next to Slicer."))

    @staticmethod
    def detectedDevice() -> str:
        try:
            return deps.detect_device()
        except Exception as exc:  # a broken torch install must not break the module panel
            return _("unknown ({error})").format(error=exc)

    @staticmethod
    def modelChoices(extra: Optional[list[str]] = None) -> list[tuple[str, str]]:
        """(title, MODEL argument) pairs: registry, cache, then ``extra`` paths."""
        try:
            from HLFDSegmentLib.model_registry import builtin_models, cached_models, load_registry
        except ImportError:  # dependencies not installed yet: only explicit paths
            return slicerjob.model_choices([], [], extra or [])
        try:
            entries = load_registry()
        except Exception as exc:
            logging.warning("HLFD Segment: model registry not readable: %s", exc)
            entries = []
        return slicerjob.model_choices(entries, cached_models(), extra or [], builtin_models())

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install torch (PyTorch extension) and the rest (pip, Slicer's packages pinned).

        Returns False if the user declined; raises RuntimeError with a clear message on failure."""
        torchMissing = deps.torch_missing()
        missing = deps.missing_requirements()
        if not torchMissing and not missing:
            return True
        names = (["torch"] if torchMissing else []) + [module for module, _ in missing]
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _(
                "HLFD Segment needs these Python packages: {names}. Install them now? "
                "This downloads several hundred MB once; Slicer's own packages are not changed."
            ).format(names=", ".join(names))
        ):
            return False
        if torchMissing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(
                    _("Install the PyTorch extension from the Extensions Manager, restart Slicer.")
                ) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=deps.TORCH_REQUIREMENT
            )
            if torch is None:
                raise RuntimeError(_("PyTorch could not be installed (PyTorch extension)."))
        with tempfile.TemporaryDirectory() as folder, slicer.util.WaitCursor():
            deps.install(missing, slicer.util.pip_install, folder)
        return True

    # -- segmentation ---------------------------------------------------------------------------
    def start(
        self,
        volumeNode: Any,
        model: str,
        device: str = "auto",
        tta: bool = False,
        segmentationNode: Any = None,
    ) -> "SegmentationRun":
        """Launch the worker for ``volumeNode``; poll the returned run, then :meth:`finish`."""
        run = SegmentationRun(
            volumeNode,
            model,
            slicerjob.device_argument(device),
            tta,
            segmentation=segmentationNode,
            python=self.pythonExecutable(),
        )
        run.start()
        return run

    def finish(self, run: "SegmentationRun", show3D: bool = True) -> Any:
        """Put a finished run's result into the scene; returns the segmentation node."""
        return run.apply(show_3d=show3D)

    def segment(
        self,
        volumeNode: Any,
        model: Optional[str] = None,
        device: str = "auto",
        tta: bool = False,
        segmentationNode: Any = None,
        show3D: bool = False,
        timeout: Optional[float] = None,
    ) -> Any:
        """Segment ``volumeNode`` and wait; returns the segmentation node (raises on failure).

        ``model``: package folder/.zip or registry id (default: the first available model)."""
        self.installDependencies(askConfirmation=not slicer.app.commandOptions().noMainWindow)
        if model is None:
            choices = self.modelChoices()
            if not choices:
                raise ValueError(_("No model available: pass model='path/to/package'."))
            model = choices[0][1]
        run = self.start(volumeNode, model, device, tta, segmentationNode)
        state = run.wait(timeout, on_events=lambda job, events: slicer.app.processEvents())
        if state is not slicerjob.JobState.DONE:
            run.cancel()
            raise RuntimeError(
                run.job.error or _("Segmentation {state}.").format(state=state.value)
            )
        return self.finish(run, show3D)


#
# Test
#


class HLFDSegmentTest(ScriptedLoadableModuleTest):
    """Self-test: whole flow on a phantom CT with a small model package built on the fly."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        if not SUPPORTED:
            self.delayDisplay(unsupportedMessage())
            return
        self.setUp()
        self.test_SegmentPhantom()

    def test_SegmentPhantom(self) -> None:
        import numpy as np

        self.delayDisplay(_("Installing dependencies if needed"))
        logic = HLFDSegmentLogic()
        logic.installDependencies(askConfirmation=False)
        from HLFDSegmentLib.modelpackage import make_card, save_package
        from HLFDSegmentLib.nets import build_network

        self.delayDisplay(_("Creating a phantom CT and a small model"))
        folder = tempfile.mkdtemp(prefix="hlfd-selftest-")
        volumeNode = slicer.util.loadVolume(str(samples.sample_ct("kidney", folder)))
        net = build_network("tiny_unet2d", 2, 1, 3, base=4)
        card = make_card(
            name="selftest",
            version="0.0.1",
            task="kidney",
            architecture="tiny_unet2d",
            spatial_dims=2,
            network_kwargs={"base": 4},
        )
        package = save_package(os.path.join(folder, "model"), card, net.state_dict())

        self.delayDisplay(_("Segmenting"))
        segmentation = logic.segment(volumeNode, model=str(package), device="cpu", show3D=True)
        seg = segmentation.GetSegmentation()
        self.assertEqual(seg.GetNumberOfSegments(), 2)
        self.assertEqual(seg.GetNthSegment(0).GetName(), "Kidney")
        self.assertEqual(seg.GetNthSegment(1).GetName(), "Kidney tumor")
        self.assertFalse(seg.GetNthSegment(0).GetNameAutoGenerated())
        tables = slicer.util.getNodesByClass("vtkMRMLTableNode")
        self.assertEqual(len(tables), 1)
        self.assertEqual(tables[0].GetNumberOfRows(), 2)
        self.assertTrue(np.isfinite(float(tables[0].GetCellText(0, 1))))

        self.delayDisplay(_("Failure leaves the segmentation unchanged"))
        with self.assertRaises(RuntimeError):
            logic.segment(
                volumeNode,
                model=os.path.join(folder, "missing.zip"),
                device="cpu",
                segmentationNode=segmentation,
            )
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay(_("Test passed"))
