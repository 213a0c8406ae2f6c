"""Reporting: latency measurement, tables."""
from fxopt.report.timing import compare_latency, format_table

__all__ = ["compare_latency", "format_table"]
