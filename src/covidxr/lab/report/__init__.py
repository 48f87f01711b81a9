"""Reports of a run, of a ``reproduce`` folder and of a designs comparison: ``report.md`` beside the PNGs,
``report.html`` self-contained.

One module per job: ``document`` (the blocks and their Markdown/HTML rendering), ``formatting`` (how
numbers are written), ``reading`` (what a run folder holds), ``limitations``, ``checks`` (explanation
checks and shortcut audit), ``holdout`` (rates on unseen sources and datasets), ``paper``, ``design_runs`` (the
runs of a designs folder, scored against the validity targets), and the three reports ``run``, ``reproduce`` and
``designs``.

The reports read pandas tables; the model card only needs ``document`` and ``formatting``. So the report
modules are imported on first use of their names here: ``import covidxr.runtime.formatting`` stays free of
pandas and torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from covidxr.runtime.document import (
    Block,
    Details,
    Figure,
    Heading,
    Items,
    Links,
    Table,
    Text,
    Verdict,
    render_html,
    render_markdown,
    write_report,
)

if TYPE_CHECKING:
    from covidxr.lab.report.design_runs import (
        VALIDITY_TARGETS,
        Design,
        above_chance_within_site,
        best_design,
        shortfall,
        targets_met,
        validity_figures,
    )
    from covidxr.lab.report.designs import (
        MAX_HELD_OUT_ADULT_CALLED_COVID,
        TARGET_HELD_OUT_SENSITIVITY,
        write_designs_report,
    )
    from covidxr.lab.report.limitations import confounding
    from covidxr.lab.report.paper import FIGURES, PAPER_RESULTS
    from covidxr.lab.report.reproduce import write_reproduce_report
    from covidxr.lab.report.run import CALIBRATION_FIGURE, write_run_report

# Name -> the module that defines it, imported when the name is first asked for.
_LAZY = {
    "CALIBRATION_FIGURE": "run",
    "write_run_report": "run",
    "FIGURES": "paper",
    "PAPER_RESULTS": "paper",
    "write_reproduce_report": "reproduce",
    "confounding": "limitations",
    "Design": "design_runs",
    "MAX_HELD_OUT_ADULT_CALLED_COVID": "designs",
    "TARGET_HELD_OUT_SENSITIVITY": "designs",
    "VALIDITY_TARGETS": "design_runs",
    "above_chance_within_site": "design_runs",
    "best_design": "design_runs",
    "shortfall": "design_runs",
    "targets_met": "design_runs",
    "validity_figures": "design_runs",
    "write_designs_report": "designs",
}

__all__ = [
    "CALIBRATION_FIGURE",
    "FIGURES",
    "MAX_HELD_OUT_ADULT_CALLED_COVID",
    "PAPER_RESULTS",
    "TARGET_HELD_OUT_SENSITIVITY",
    "VALIDITY_TARGETS",
    "Block",
    "Design",
    "Details",
    "Figure",
    "Heading",
    "Items",
    "Links",
    "Table",
    "Text",
    "Verdict",
    "above_chance_within_site",
    "best_design",
    "confounding",
    "render_html",
    "render_markdown",
    "shortfall",
    "targets_met",
    "validity_figures",
    "write_designs_report",
    "write_report",
    "write_reproduce_report",
    "write_run_report",
]


def __getattr__(name: str) -> object:
    """The report names that need pandas, imported from their module on first use."""
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """What ``dir(covidxr.lab.report)`` lists: the public names, lazy ones included."""
    return sorted(set(globals()) | set(_LAZY))
