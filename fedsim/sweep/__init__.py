"""Sweeps: grids of configs, resumable (``fedsim sweep``). The package is callable: ``fedsim.sweep(SWEEP_FILE, ...)``
is :func:`fedsim.api.sweep`."""

from fedsim._callable import make_callable

make_callable(__name__, "sweep")
