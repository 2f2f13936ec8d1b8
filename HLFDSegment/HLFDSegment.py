"""HLFD Segment: kidney / liver tumour segmentation on CT in 3D Slicer (thin Qt layer).

Everything that can run without the Slicer application lives in HLFDSegmentLib (tested headless
with slicer-core): the worker subprocess and its job runner (slicerjob), MRML conversions and
the whole segment flow (mrml), dependency installation (deps) and sample data (samples).
"""

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
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
    from HLFDSegmentLib import (
        background,
        deps,
        modelmenu,
        mrml,
        progress,
        samples,
        slicerjob,
        workerpool,
    )
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


#
# HLFDSegment
#


class HLFDSegment(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Kidney and Liver Tumor Segmentation (HLFD)")
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
        self._cardShownFor: Optional[str] = None
        self._loadModelMenu = None
        self._lastInput = None
        self._loggedStage = None
        self._install = None  # the install process (torch and pip) in the background
        self._installNeeds: tuple = (False, [])  # (torch needed, missing pip requirements)
        self._probe = None  # the device probe process (torch is never imported in Slicer's)
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
        self.ui.progressBar.visible = False
        self.ui.warningsLabel.visible = False
        self.ui.warningsLabel.styleSheet = "color: #b35900"
        self.startDeviceProbe()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self._setUpLoadModelMenu()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self._extraModels = modelmenu.remembered_models(
            slicer.app.userSettings().value(modelmenu.SETTINGS_KEY)
        )
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopRun()
        for helper in (self._probe, self._install):
            if helper is not None:
                helper.cancel()
        self._probe = self._install = None
        self._timer.stop()
        if SUPPORTED:
            HLFDSegmentLogic.stopWorkers()
        self.removeObservers()

    def _stopRun(self) -> None:
        """Kill the worker, if one runs (never waits for it); polling goes on for the probe."""
        if self._run is not None:
            self._run.cancel()
            self._run = None
        self._stopTimerIfIdle()

    def _stopTimerIfIdle(self) -> None:
        if self._run is None and self._probe is None and self._install is None:
            self._timer.stop()

    def startDeviceProbe(self) -> None:
        """Detect the device once, in a helper process (never blocks, never imports torch here);
        the result arrives in :meth:`onTimer`. Runs again after dependency installs."""
        if self._probe is not None:
            return
        try:
            self._probe = self.logic.startDeviceProbe()
        except Exception as exc:  # no PythonSlicer: say so, the module still works
            self.ui.detectedDeviceLabel.text = _("Detected: unknown ({error})").format(error=exc)
            return
        self.ui.detectedDeviceLabel.text = _("Detected: checking...")
        self._timer.start()

    def _pollDeviceProbe(self) -> None:
        if self._probe is None:
            return
        self._probe.poll()
        found = background.probe_result(self._probe)
        if found is not None:
            self._probe = None
            self.ui.detectedDeviceLabel.text = _("Detected: {device}").format(device=found)

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
        self._showVolumesTable()
        self._showModelCard()
        if self._install is not None:
            self.ui.applyButton.text = _("Installing...")
            self.ui.applyButton.toolTip = _("Installing the Python packages the model needs.")
            self.ui.applyButton.enabled = False
            return
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

    def _showVolumesTable(self) -> None:
        """The table of the chosen output segmentation (its own, by node reference)."""
        output = self._parameterNode.outputSegmentation if self._parameterNode else None
        table = HLFDSegmentLogic.volumesTable(output)
        if self.ui.volumesTableView.mrmlTableNode() is not table:
            self.ui.volumesTableView.setMRMLTableNode(table)

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
        """List the models again (after installs, loads and runs); say why a source failed."""
        found = self.logic.listModels(self._extraModels)
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for title, spec in found.choices:
            combo.addItem(title, spec)
        combo.blockSignals(wasBlocked)
        self.ui.modelProblemsLabel.text = "\n".join(found.problems)
        self.ui.modelProblemsLabel.visible = bool(found.problems)
        self._syncComboBoxes()
        self._showModelCard()

    def _showModelCard(self) -> None:
        spec = self._parameterNode.model if self._parameterNode else ""
        if spec == self._cardShownFor:
            return
        self._cardShownFor = spec
        card = modelmenu.read_card(spec) if spec else None
        self.ui.modelCardLabel.text = modelmenu.card_summary(card)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def _setUpLoadModelMenu(self) -> None:
        """Load model: a menu with two entries (.zip file or folder); cancelling either dialog
        opens nothing else."""
        menu = qt.QMenu(self.ui.loadModelButton)
        zipAction = menu.addAction(_("Model package .zip file..."))
        zipAction.connect("triggered()", self.onLoadModelZip)
        folderAction = menu.addAction(_("Model package folder..."))
        folderAction.connect("triggered()", self.onLoadModelFolder)
        self.ui.loadModelButton.setMenu(menu)
        self._loadModelMenu = menu

    def onLoadModelZip(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Model package (.zip)"), "", _("Model package (*.zip)")
        )
        if path:
            self.useModelPath(path)

    def onLoadModelFolder(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Model package folder (holding model.json)")
        )
        if path:
            self.useModelPath(path)

    def useModelPath(self, path: str) -> None:
        """Add a package from disk to the list, remember it across sessions, select it."""
        problem = modelmenu.check_model_path(path)
        if problem:
            slicer.util.errorDisplay(problem)
            return
        self._extraModels = modelmenu.remember_model(self._extraModels, path)
        slicer.app.userSettings().setValue(modelmenu.SETTINGS_KEY, self._extraModels)
        self.refreshModels()
        self._parameterNode.model = path

    # -- run ------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._install is not None:
            return  # the button is disabled meanwhile: never two installs or runs
        if self._run is not None:
            self.onCancel()
            return
        p = self._parameterNode
        existing = p.outputSegmentation
        if (  # dialogs are asked before any wait cursor
            existing
            and existing.GetSegmentation().GetNumberOfSegments()
            and not slicer.util.confirmOkCancelDisplay(
                _("Replace this model's segments in {name}? Segments you drew are kept.").format(
                    name=existing.GetName()
                )
            )
        ):
            return
        torchMissing, missing = self.logic.requirements(p.model, p.device)
        if torchMissing or missing:
            if not slicer.util.confirmOkCancelDisplay(
                _(deps.install_question(torchMissing, missing))
            ):
                return
            self._startInstall(torchMissing, missing)
            return
        self._startRun()

    def _startInstall(self, torchMissing: bool, missing: list) -> None:
        """Install in a followed background process: its lines go to the Log panel, Slicer
        stays responsive, Segment is disabled until it ends; the run starts after it."""
        names = deps.missing_names(torchMissing, missing)
        try:  # tryWithErrorDisplay shows the error, then re-raises it
            with slicer.util.tryWithErrorDisplay(_("Failed to start the installation.")):
                self._install = self.logic.startInstall(torchMissing, missing)
                self._installNeeds = (torchMissing, missing)
                self.ui.logTextEdit.clear()
                self.ui.logCollapsibleButton.collapsed = False
                self.ui.statusLabel.text = _("Installing {names} ({size})...").format(
                    names=", ".join(names),
                    size=deps.size_text(deps.download_megabytes(torchMissing, missing)),
                )
                self._timer.start()
        finally:
            self._checkCanApply()

    def _pollInstall(self) -> None:
        command = self._install
        if command is None:
            return
        for line in command.poll():
            self.ui.logTextEdit.appendPlainText(line)
        if not command.finished:
            return
        self._install = None
        importlib.invalidate_caches()
        torchNeeded, missing = self._installNeeds
        still = deps.missing_names(
            torchNeeded and deps.torch_missing(), deps.missing_requirements(missing)
        )
        if command.ok and not still:
            self.ui.statusLabel.text = _("Installed; starting the segmentation...")
            self.startDeviceProbe()
            self.refreshModels()  # the registry needs jsonschema: its models appear now
            self._startRun()
        else:
            last = "\n".join(command.output[-8:])
            self.ui.statusLabel.text = _("Installation failed; see the log below.")
            slicer.util.errorDisplay(
                _("Installing {names} failed:\n{output}").format(
                    names=", ".join(still) or _("the packages"), output=last
                )
            )
        self._checkCanApply()

    def _startRun(self) -> None:
        p = self._parameterNode
        try:  # tryWithErrorDisplay shows the error, then re-raises it
            with slicer.util.tryWithErrorDisplay(
                _("Failed to start the segmentation."), waitCursor=True
            ):
                self._run = self.logic.start(
                    p.inputVolume, p.model, p.device, p.tta, p.outputSegmentation
                )
                self.ui.progressBar.visible = True
                self.ui.progressBar.value = 0
                self.ui.logTextEdit.clear()
                self.ui.logFileLabel.text = ""
                self._loggedStage = None
                self._showWarnings([])
                self.ui.statusLabel.text = _("Starting...")
                self.ui.timeLabel.text = ""
                self._timer.start()
        finally:
            self._checkCanApply()

    def onCancel(self) -> None:
        run = self._run
        self._stopRun()
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
        if run is not None:
            self._showKeptLog(run.job)
        self._checkCanApply()

    def _appendLog(self, events: list) -> None:
        """One line per new worker event in the log panel (a stage once, not every percent)."""
        for event in events:
            if event.get("event") == "progress":
                if event.get("stage") == self._loggedStage:
                    continue
                self._loggedStage = event.get("stage")
            line = slicerjob.describe_event(event)
            if line:
                self.ui.logTextEdit.appendPlainText(line)

    def _showKeptLog(self, job: Any) -> None:
        """After a run: the whole log (events and the worker's own output) and where it is kept."""
        if job.kept_log is None:
            return
        try:
            self.ui.logTextEdit.setPlainText(job.kept_log.read_text(encoding="utf-8"))
        except OSError:
            return
        self.ui.logFileLabel.text = _("Kept in {path}").format(path=str(job.kept_log))

    def _showWarnings(self, warnings: list) -> None:
        self.ui.warningsLabel.text = "\n".join("\u26a0 " + w for w in warnings)
        self.ui.warningsLabel.visible = bool(warnings)

    def _statusWhileRunning(self, job: Any) -> str:
        if job.stage == "download" and job.download:
            done, total = job.download.get("done", 0), job.download.get("total", 0)
            if total:
                return _("Downloading the model: {done:.1f} of {total:.1f} MB ({percent}%)").format(
                    done=done / 1e6, total=total / 1e6, percent=int(100 * done / total)
                )
            return _("Downloading the model: {done:.1f} MB").format(done=done / 1e6)
        stage = progress.STAGE_NAMES.get(job.stage, job.stage)
        return _("{stage}... {percent}%").format(
            stage=_(stage) if stage else _("Starting"), percent=int(100 * job.fraction)
        )

    def onTimer(self) -> None:
        self._pollDeviceProbe()
        self._pollInstall()
        run = self._run
        if run is None:
            self._stopTimerIfIdle()
            return
        self._appendLog(run.poll())
        job = run.job
        self.ui.progressBar.value = round(100 * job.fraction)
        self.ui.statusLabel.text = self._statusWhileRunning(job)
        self._showWarnings(job.warnings)
        text = _("Elapsed {seconds:.0f} s").format(seconds=job.elapsed)
        if job.device_info:
            if job.device_info.get("description"):
                self.ui.detectedDeviceLabel.text = _("Running on: {device}").format(
                    device=job.device_info["description"]
                )
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
        self._run = None
        self._stopTimerIfIdle()
        self.ui.progressBar.visible = False
        try:  # tryWithErrorDisplay shows the error, then re-raises it
            if job.state is slicerjob.JobState.DONE:
                self.ui.statusLabel.text = _("Failed to load the segmentation.")
                with slicer.util.tryWithErrorDisplay(_("Failed to load the segmentation."), True):
                    segmentation = self.logic.finish(run, self._parameterNode.show3D)
                    # the result is the output of the CT it was computed for only: another CT
                    # picked meanwhile keeps its own output (a new segmentation)
                    if self._parameterNode.inputVolume is run.volume:
                        self._parameterNode.outputSegmentation = segmentation
                        self.ui.volumesTableView.setMRMLTableNode(run.table)
                    self.ui.statusLabel.text = _(slicerjob.finished_status(job))
            else:
                run.cancel()  # keeps the log, removes the work folder
                self.ui.statusLabel.text = _(slicerjob.finished_status(job))
                self.ui.logCollapsibleButton.collapsed = False
                slicer.util.errorDisplay(job.error or _("Segmentation failed."))
        finally:
            self._showKeptLog(job)
            self.refreshModels()  # a downloaded model is now cached
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
    def logDirectory() -> str:
        """Where the logs of the last runs are kept (the module's temporary folder)."""
        return os.path.join(slicer.app.temporaryPath, "HLFDSegment", "logs")

    def startDeviceProbe(self) -> "background.BackgroundCommand":
        """Start the helper process that names the device (torch is imported there only)."""
        return background.device_probe(self.pythonExecutable()).start()

    @staticmethod
    def listModels(extra: Optional[list[str]] = None) -> "modelmenu.ModelList":
        """The model selector's entries and why a source failed (works before any install)."""
        return modelmenu.list_models(extra or [])

    @staticmethod
    def modelChoices(extra: Optional[list[str]] = None) -> list[tuple[str, str]]:
        """(title, MODEL argument) pairs: built-in, registry, cache, then ``extra`` paths."""
        return modelmenu.list_models(extra or []).choices

    @staticmethod
    def requirements(model: str, device: str = "auto") -> tuple[bool, list]:
        """(torch needed and missing, missing pip requirements) to run ``model`` on ``device``:
        on the CPU a model with an ONNX graph needs onnxruntime only, no PyTorch."""
        return deps.requirements_for(
            slicerjob.device_argument(device), modelmenu.has_onnx_graph(model)
        )

    def installDependencies(
        self, model: Optional[str] = None, device: str = "auto", askConfirmation: bool = True
    ) -> bool:
        """Install what running ``model`` on ``device`` needs (torch through light-the-torch,
        the rest with pip, Slicer's packages pinned) and wait (for scripts; the panel follows the
        same install in a background process). Without a model: the torch path.

        Returns False if the user declined; raises RuntimeError with a clear message on failure."""
        if model is None:
            torchMissing, missing = deps.torch_missing(), deps.missing_requirements()
        else:
            torchMissing, missing = self.requirements(model, device)
        if not torchMissing and not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _(deps.install_question(torchMissing, missing))
        ):
            return False
        argv = deps.install_command(self.pythonExecutable(), torchMissing, missing)
        result = subprocess.run(
            argv, env=slicerjob.worker_env(), capture_output=True, text=True, check=False
        )
        logging.info(result.stdout + result.stderr)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            message = _("Installing the Python packages failed:\n{tail}")
            raise RuntimeError(message.format(tail=tail))
        return True

    def startInstall(self, torchNeeded: bool, missing: list) -> "background.BackgroundCommand":
        """torch (light-the-torch: the build for this computer's driver) if needed, then pip for
        ``missing`` (Slicer's packages pinned), in a background process: poll it."""
        argv = deps.install_command(self.pythonExecutable(), torchNeeded, missing)
        return background.BackgroundCommand(argv).start()

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
            log_dir=self.logDirectory(),
            launcher=workerpool.shared_pool().launch,  # model stays loaded between runs
        )
        run.start()
        return run

    @staticmethod
    def volumesTable(segmentationNode: Any) -> Any:
        """The segment volumes table of a segmentation this module filled (None if none)."""
        return mrml.volumes_table_of(segmentationNode)

    @staticmethod
    def stopWorkers() -> None:
        """Stop the persistent workers (module exit); the next segmentation starts one again."""
        workerpool.stop_shared_pool()

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
        """Segment ``volumeNode`` and wait; returns the segmentation node (raises on failure,
        and before any work if the packages it needs are missing and not installed).

        ``model``: package folder/.zip or registry id (default: the first available model)."""
        if model is None:
            choices = self.modelChoices()
            if not choices:
                raise ValueError(_("No model available: pass model='path/to/package'."))
            model = choices[0][1]
        torchMissing, missing = self.requirements(model, device)
        try:
            installed = self.installDependencies(
                model, device, askConfirmation=not slicer.app.commandOptions().noMainWindow
            )
            reason = "" if installed else _("The installation was declined.")
        except RuntimeError as error:  # the install failed: its message has pip's last lines
            installed, reason = False, str(error)
        if not installed:  # stop before any work: the scene stays as it was
            names = deps.missing_names(torchMissing, missing)
            message = _(
                "HLFD Segment cannot run: the Python packages {names} are not installed. {reason}"
                "\nInstall them by clicking Segment in the HLFD Segment module and accepting the"
                " installation, or in Slicer's Python console:\nfrom HLFDSegment import"
                " HLFDSegmentLogic; HLFDSegmentLogic().installDependencies({model!r}, {device!r})"
            )
            raise RuntimeError(
                message.format(names=", ".join(names), reason=reason, model=model, device=device)
            )
        run = mrml.segment_volume(
            volumeNode,
            model,
            slicerjob.device_argument(device),
            tta,
            segmentation=segmentationNode,
            show_3d=show3D,
            python=self.pythonExecutable(),
            timeout=timeout,
            on_events=lambda job, events: slicer.app.processEvents(),
            log_dir=self.logDirectory(),
        )
        return run.segmentation


#
# Test
#


class HLFDSegmentTest(ScriptedLoadableModuleTest):
    """Self-test (Reload & Test): the whole flow on the sample kidney CT with the built-in
    kidney model; the checks are :func:`HLFDSegmentLib.mrml.result_problems`, which the
    headless tests run on the same flow (Testing/test_mrml.py)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        if not SUPPORTED:
            self.delayDisplay(unsupportedMessage())
            return
        self.setUp()
        self.test_SegmentSampleWithBuiltInModel()
        self.setUp()
        self.test_FailureLeavesTheSceneUnchanged()

    def _sampleVolume(self) -> Any:
        path = samples.sample_ct("kidney")
        return slicer.util.loadVolume(str(path), {"name": samples.SAMPLES["kidney"][0]})

    def test_SegmentSampleWithBuiltInModel(self) -> None:
        self.delayDisplay(_("Installing dependencies if needed"))
        logic = HLFDSegmentLogic()
        logic.installDependencies("kidney", askConfirmation=False)
        self.delayDisplay(_("Segmenting the sample kidney CT with the built-in kidney model"))
        volumeNode = self._sampleVolume()
        segmentation = logic.segment(volumeNode, model="kidney", show3D=True, timeout=600)
        table = logic.volumesTable(segmentation)
        card = modelmenu.read_card("kidney")
        self.assertEqual(mrml.result_problems(segmentation, table, card["labels"]), [])
        self.assertEqual(
            [s["name"] for s in card["labels"]],
            [
                segmentation.GetSegmentation().GetNthSegment(i).GetName()
                for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
            ],
        )
        self.delayDisplay(_("A rerun refills the same table"))
        again = logic.segment(volumeNode, model="kidney", segmentationNode=segmentation)
        self.assertIs(again, segmentation)
        self.assertIs(logic.volumesTable(again), table)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLTableNode")), 1)
        self.delayDisplay(_("Test passed"))

    def test_FailureLeavesTheSceneUnchanged(self) -> None:
        """A package with the built-in kidney card and no weights: it needs exactly what the
        first test installed (a missing .zip has no card, so it would need torch), and the
        worker refuses it."""
        volumeNode = self._sampleVolume()
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        broken = os.path.join(slicer.app.temporaryPath, "HLFDSegment", "broken-model")
        os.makedirs(broken, exist_ok=True)
        with open(os.path.join(broken, "model.json"), "w", encoding="utf-8") as card:
            json.dump(modelmenu.read_card("kidney"), card)
        with self.assertRaises(RuntimeError):
            HLFDSegmentLogic().segment(volumeNode, model=broken)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay(_("Test passed"))
