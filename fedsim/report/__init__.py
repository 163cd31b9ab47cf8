"""Reports over runs and sweeps: Markdown tables + PNG figures (``fedsim report``)."""

from fedsim.report.build import make_report
from fedsim.report.records import RECORD_COLUMNS, load_records, run_record

__all__ = ["RECORD_COLUMNS", "load_records", "make_report", "run_record"]
