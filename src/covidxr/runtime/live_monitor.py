"""The service's live monitor: ``covidxr monitor``'s figures and rules over the last answers ``covidxr serve``
gave, for ``/healthz`` and the ``/monitor`` page."""

from __future__ import annotations

import html
import math
from collections import deque
from typing import Any

from covidxr import DISCLAIMER
from covidxr.runtime.api import ForeignModel, Model
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.monitor import (
    MIN_WINDOW_SHARE,
    RULES,
    answer_row,
    calibration_reference,
    compare_window,
    shares,
)

__all__ = ["MONITOR_WINDOW", "LiveMonitor", "render_monitor_html"]

MONITOR_WINDOW = 500  # answers the live monitor keeps (the last ones given)


# ---------------------------------------------------------------------------------------------
# The live monitor: covidxr monitor's figures over the last answers given
# ---------------------------------------------------------------------------------------------


class LiveMonitor:
    """The figures of ``covidxr monitor`` (``runtime.monitor``: its functions and its rules) over the last
    ``window`` answers this process gave (/api/predict and /api/explain; refused uploads are not answers):
    OOD rate, no-answer rate, share called COVID-19 and, with a site file that keeps its calibration
    distributions, PSI and KS of p(COVID-19) against the calibration images. As ``covidxr monitor`` does with
    a short last window, the rules are applied once a quarter of a window has been answered."""

    def __init__(self, model: Model | ForeignModel, window: int = MONITOR_WINDOW):
        if window < 4:
            raise CovidxrError(f"--monitor-window must be at least 4 answers, not {window}")
        self.window, self.threshold = window, model.covid_threshold  # None: a foreign model's argmax decides
        self.rows: deque = deque(maxlen=window)
        self.minimum = max(1, math.ceil(MIN_WINDOW_SHARE * window))
        self.reference, self.calibration, self.not_compared = None, None, None
        site = model.site
        if site is None:
            self.not_compared = (
                "no site file: PSI, KS and the alarm rules compare with a site's calibration images; "
                "run `covidxr serve --site site.json` (made by `covidxr calibrate`)"
            )
        else:
            try:
                self.reference, self.calibration = calibration_reference(site)
            except CovidxrError as exc:
                self.not_compared = str(exc)

    def add(self, answer: dict) -> None:
        self.rows.append(answer_row(answer))

    def status(self) -> dict:
        rows = list(self.rows)
        figures: dict[str, Any] = dict.fromkeys(
            ("ood_rate", "no_answer_rate", "covid_share", "psi", "ks_statistic", "ks_pvalue")
        )
        alarms: list[str] = []
        note = None
        if rows and self.reference is not None:
            window = compare_window(1, 1, rows, self.reference, self.calibration, self.threshold)
            figures.update(
                ood_rate=window.ood_rate,
                no_answer_rate=window.no_answer_rate,
                covid_share=window.covid_share,
                psi=window.psi,
                ks_statistic=window.ks_statistic,
                ks_pvalue=window.ks_pvalue,
            )
            if len(rows) >= self.minimum:
                alarms = window.alarms
            else:
                note = f"the rules apply from {self.minimum} answers (a quarter of the window); {len(rows)} so far"
        elif rows:
            ood, no_answer, covid_share = shares(rows, self.threshold if self.threshold is not None else math.inf)
            if self.threshold is None:  # no threshold to count COVID-19 calls by
                covid_share = None
            figures.update(ood_rate=ood, no_answer_rate=no_answer, covid_share=covid_share)
        return {
            "window": self.window,
            "n": len(rows),
            "figures": figures,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "covid_threshold": self.threshold,
            "rules": {**RULES, "minimum_answers": self.minimum},
            "alarm": bool(alarms),
            "alarms": alarms,
            "not_compared": self.not_compared,
            "note": note,
        }


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _number(value: float | None, form: str = ".3f") -> str:
    return "—" if value is None else format(value, form)


def render_monitor_html(status: dict, identity: str, site: str | None) -> str:
    """The /monitor page: the live figures beside the calibration's, the verdict and the rules."""
    calibration = status["calibration"] or {}
    figures = status["figures"]
    rows = [
        ("OOD rate", _percent(figures["ood_rate"]), _percent(calibration.get("ood_rate"))),
        ("No-answer rate", _percent(figures["no_answer_rate"]), _percent(calibration.get("no_answer_rate"))),
        ("Called COVID-19", _percent(figures["covid_share"]), _percent(calibration.get("covid_share"))),
        ("PSI of p(COVID-19)", _number(figures["psi"]), "0 (reference)" if calibration else "—"),
        ("KS D of p(COVID-19)", _number(figures["ks_statistic"]), "0 (reference)" if calibration else "—"),
        ("KS p-value", _number(figures["ks_pvalue"], ".2g"), "—"),
    ]
    table = "".join(
        f"<tr><th scope='row'>{html.escape(a)}</th><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in rows
    )
    if status["alarm"]:
        verdict = "<p id='verdict' class='alarm'>ALARM: " + html.escape("; ".join(status["alarms"])) + "</p>"
    else:
        verdict = "<p id='verdict'>No alarm</p>"
    notes = "".join(
        f"<p class='note'>{html.escape(text)}</p>" for text in (status["not_compared"], status["note"]) if text
    )
    r = status["rules"]
    rules = (
        f"<li>PSI of p(COVID-19) ≥ {r['psi']} (10 bins at the calibration deciles)</li>"
        f"<li>KS p &lt; {r['ks_pvalue']} and KS D ≥ {r['ks_statistic']}</li>"
        f"<li>OOD rate more than {100 * r['ood_rate_rise']:.0f} points above calibration's</li>"
        f"<li>No-answer rate more than {100 * r['no_answer_rate_rise']:.0f} points above calibration's</li>"
        f"<li>Rules apply from {r['minimum_answers']} answers (a quarter of the window)</li>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>covidxr monitor</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body class="monitor-page">
<h1>Input monitor</h1>
<div id="disclaimer" class="disclaimer" role="note"><strong>Research use only.</strong> {html.escape(DISCLAIMER)}</div>
<p>Model <code>{html.escape(identity)}</code>; site {html.escape(site or "none (no --site)")}; COVID-19 threshold
{_number(status["covid_threshold"], ".4f")}.
The last <span id="n">{status["n"]}</span> answers given since start (window of
{status["window"]}).</p>
{verdict}{notes}
<table id="figures"><thead><tr><th></th><th>Last answers</th><th>Calibration</th></tr></thead>
<tbody>{table}</tbody></table>
<h2>Alarm rules</h2><ul id="rules">{rules}</ul>
<p>An alarm says the inputs changed (scanner, protocol, population, pipeline), not that the answers are wrong;
no alarm does not prove they are right: the monitor sees no labels.</p>
<p><a href="/">Back to the viewer</a> · <a href="/healthz">/healthz</a></p>
</body></html>
"""
