"""HLFDSegment runtime: kidney and liver tumour segmentation on CT with distilled students.

Pure Python (torch, MONAI, SimpleITK); importable without 3D Slicer and without Qt.
"""

__version__ = "0.1.0"
