"""Activation Gram matrices of Linear inputs: collecting them and their on-disk format."""

from .format import FORMAT, GramDir

__all__ = ["FORMAT", "GramDir"]
