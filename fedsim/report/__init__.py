"""Reports over runs and sweeps: Markdown tables + PNG figures (``fedsim report``). The package is callable:
``fedsim.report(INPUTS, ...)`` is :func:`fedsim.api.report`."""

from fedsim._callable import make_callable
from fedsim.report.build import make_report
from fedsim.report.records import RECORD_COLUMNS, load_records, run_record

__all__ = ["RECORD_COLUMNS", "load_records", "make_report", "run_record"]

make_callable(__name__, "report")
