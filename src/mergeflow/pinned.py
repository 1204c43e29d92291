"""Importing this pins the CPU kernels (`determinism.pin_cpu_kernels`): the first import of every
stage script, so that the stages themselves, not the user's shell, make their outputs reproducible."""

from .determinism import pin_cpu_kernels

pin_cpu_kernels()
