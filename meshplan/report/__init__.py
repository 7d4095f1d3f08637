"""``meshplan report``: a Markdown (+ HTML) report of a plan, with pictures made by matplotlib.

The report shows the inputs, the chosen plan and its alternatives, why rejected families lost, memory per
pipeline rank against device memory, the iteration time broken down, the pipeline schedule as the planner
prices it, the layer partition and recompute per stage, and (given a launcher metrics file) measured next to
predicted. ``compare`` adds what changed against an older plan.

    document.py    the document model (Markdown and HTML), write_report and build_document
    pictures.py    the matplotlib drawings
    schedule.py    the plan's pipeline schedule from the planner's own simulation
    comparison.py  compare_plans, compare_summary and the "What changed" section
    metrics.py     a run's metrics JSON lines and their summary (meshplan/metrics_summary.py)
    facts.py       what the report reads off a plan, and its number formats

matplotlib is imported lazily (inside the drawing functions), so importing this package is cheap; it is the
optional extra ``meshplan[report]``.
"""

from meshplan.report.comparison import compare_plans, compare_summary
from meshplan.report.document import Doc, ReportFiles, build_document, write_report
from meshplan.report.facts import MEMORY_KEYS, PICTURES, TIME_KEYS, TIME_LABELS, stage_memory
from meshplan.report.metrics import Measured, load_metrics, summarize_metrics
from meshplan.report.pictures import (DEVICE_LINE_MAX_RATIO, draw_alternatives, draw_compare, draw_measured,
                                      draw_memory, draw_schedule, draw_stages, draw_time)
from meshplan.report.schedule import Schedule, plan_schedule

__all__ = ["DEVICE_LINE_MAX_RATIO", "MEMORY_KEYS", "PICTURES", "TIME_KEYS", "TIME_LABELS", "Doc", "Measured",
           "ReportFiles", "Schedule", "build_document", "compare_plans", "compare_summary", "draw_alternatives",
           "draw_compare", "draw_measured", "draw_memory", "draw_schedule", "draw_stages", "draw_time",
           "load_metrics", "plan_schedule", "stage_memory", "summarize_metrics", "write_report"]
