"""Plots and the HTML / Markdown report of an experiment."""

from bnlab.report.build import Report, build_report, stats_rows

__all__ = ["Report", "build_report", "stats_rows"]
