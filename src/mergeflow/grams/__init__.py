"""Activation Gram matrices of Linear inputs: collecting them and their on-disk format."""

from .format import FORMAT, GramDir, write_grams

__all__ = ["FORMAT", "GramDir", "write_grams"]
