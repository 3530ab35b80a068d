"""Torch-only helpers shared by every layer of the package."""
