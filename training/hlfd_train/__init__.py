"""HLFD training: teacher/student distillation, datasets, training loops and model export."""

__version__ = "0.1.0"
