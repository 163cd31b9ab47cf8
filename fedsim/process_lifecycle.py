"""Seconds a driver process spends around a run rather than in it: imports at start, the garbage collector at exit.

* :class:`ImportAhead` imports modules in a background thread. The driver starts Ray first (``ray.init`` mostly
  waits for the processes it spawns) and only then needs PEFT / transformers / TensorBoard (seconds of imports):
  importing them meanwhile takes those seconds off the way to the first trained client. The caller joins the
  thread before it uses the modules, so no import of its own runs concurrently with the thread's except Ray's
  internal ones, which share no module with them (no lock cycle is possible). A failed import is left to the
  caller's own import, which then raises the error where it belongs.
* :func:`freeze_gc_at_exit` makes Python's final garbage collection skip the objects that exist at exit
  (``gc.freeze`` in an ``atexit`` handler). With torch, transformers and PEFT loaded, that last full collection
  walks millions of objects: about 1.3 s of every run's exit on the CI machine, for memory the OS reclaims anyway.
  Only interpreter exit is affected (a notebook or a test session that runs many simulations keeps its collector
  as it was until it exits). Objects are still freed by reference counting as modules are torn down; what is
  skipped is finalising unreachable cycles, which Python does not promise at exit either.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import threading
from collections.abc import Sequence

_frozen_at_exit = False


class ImportAhead:
    """Imports ``modules`` (dotted names) in a daemon thread started at construction; :meth:`join` waits for it.

    Never raises: an import that fails in the thread is retried (and raises) where the caller imports it."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = tuple(modules)
        self._thread = threading.Thread(target=self._run, name="fedsim-import-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except BaseException:  # the caller's own import reports it
                return

    def join(self) -> None:
        """Wait until every module is imported (or one failed)."""
        self._thread.join()


def freeze_gc_at_exit() -> None:
    """Register (once per process) an ``atexit`` handler that calls ``gc.freeze()``; see the module doc."""
    global _frozen_at_exit
    if not _frozen_at_exit:
        atexit.register(gc.freeze)
        _frozen_at_exit = True
