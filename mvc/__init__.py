"""MVC: Dataset Augmentation by Mixing Visual Concepts (reference implementation)."""

__version__ = "0.1.0"
