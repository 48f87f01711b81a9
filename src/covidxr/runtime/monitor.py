"""``covidxr monitor``: do a site's incoming images still look like the images it was calibrated on?
(issue 23 part 4; runtime layer: numpy and Pillow only, no scipy or matplotlib).

It reads prediction files written by ``covidxr predict --out`` (CSV, JSON or Parquet; one or several, in order), all
from one model, and the site file of that model (``covidxr calibrate``, which keeps every calibration image's
p(COVID-19) and OOD score). The rows are split into consecutive windows of ``window`` images (unreadable
images are left out; a last partial window is kept only if it holds at least a quarter of a window), or, with
``by_date`` (a column of the files that holds a date, ISO 8601: ``2024-03-01``, ``20240301``,
``2024-03-01T14:30:00``), into one window per ``day``, ``week`` (ISO) or ``month`` in date order, a period of
fewer than ``MIN_PERIOD_IMAGES`` readable images skipped. Each window is compared with the calibration images on:

- the **OOD rate** (share flagged out of distribution) and the **no-answer rate** (share given no answer);
- the **p(COVID-19) distribution**: the population stability index (PSI) over ten bins cut at the
  calibration deciles, and the two-sample Kolmogorov–Smirnov statistic D with its asymptotic p-value
  (Kolmogorov's limiting distribution at ``(√n_e + 0.12 + 0.11/√n_e)·D``, Stephens' small-sample
  correction, n_e = n₁n₂/(n₁+n₂); for window-sized samples within a few per cent of
  ``scipy.stats.ks_2samp(method="asymp")``, which uses the exact one-sample law at round(n_e));
- the **share called COVID-19** at the site threshold (among the images given an answer; reported, no rule);
- where the files have the columns ``image_width``, ``image_height``, ``bit_depth`` and ``image_mode`` (``predict
  --out`` writes them since issue 23's image facts) and the site file kept the calibration images' own: the
  **image sizes** (the two-sample KS statistic of the widths and of the heights, the larger D with its p-value)
  and the **bit depths and modes** (the total variation distance between the window's shares and
  calibration's: half the sum of the absolute differences, the larger of the two).

A window raises an alarm when any of these rules holds (``RULES``):

- PSI ≥ 0.25 (the usual "major shift" limit);
- KS p < 0.001 **and** KS D ≥ 0.1 (a shift that is both unlikely by chance and large enough to matter);
- the OOD rate, or the no-answer rate, more than 10 percentage points above calibration's;
- image sizes: KS p < 0.001 **and** KS D ≥ 0.2 (a fifth of the images sized unlike calibration's);
- bit depth or mode: shares moved by more than 10 percentage points (total variation distance > 0.1).

``covidxr monitor`` prints one line per window and exits 2 on any alarm (1 on an error, 0 otherwise), and
writes ``monitor.json`` (``MonitorReport``) and ``monitor.png`` (PSI and OOD rate per window).

An alarm says the inputs changed (scanner, protocol, population, pipeline), not that the answers are wrong;
no alarm does not prove they are right: the monitor sees no labels.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from covidxr import DISCLAIMER
from covidxr.runtime.calibration import POSITIVE
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import text_from_spreadsheet
from covidxr.runtime.records.monitor import MonitorFigures, MonitorReport, MonitorWindow
from covidxr.runtime.records.site import MIN_IMAGES
from covidxr.runtime.site import SiteCalibration, load_site
from covidxr.runtime.storage import atomic_write, stable_digest

__all__ = [
    "DECIMALS",
    "MIN_PERIOD_IMAGES",
    "MIN_WINDOW_SHARE",
    "PERIODS",
    "RULES",
    "ImageReference",
    "answer_row",
    "calibration_reference",
    "compare_window",
    "image_reference",
    "period_of",
    "describe_window",
    "draw_monitor",
    "ks_two_sample",
    "kolmogorov_sf",
    "monitor_predictions",
    "psi",
    "read_predictions",
    "shares",
    "write_monitor",
]

logger = logging.getLogger(__name__)

RULES = {
    "psi": 0.25,  # alarm at PSI >= this
    "ks_pvalue": 0.001,  # alarm at KS p < this ...
    "ks_statistic": 0.1,  # ... with KS D >= this
    "ood_rate_rise": 0.10,  # alarm when the OOD rate is more than this above calibration's
    "no_answer_rate_rise": 0.10,  # the same for the no-answer rate
    "size_ks_pvalue": 0.001,  # alarm at image-size KS p < this ...
    "size_ks_statistic": 0.2,  # ... with KS D >= this (width or height)
    "format_shift": 0.10,  # alarm when the bit-depth or mode shares moved more (total variation distance)
}
MIN_WINDOW_SHARE = 0.25  # a last partial window is kept when it holds at least this share of a window
MIN_PERIOD_IMAGES = MIN_IMAGES  # a period (--by-date) with fewer readable images is skipped
PERIODS = ("day", "week", "month")
DECIMALS = 5  # p(COVID-19) is compared at the precision site.json keeps
PSI_FLOOR = 1e-4  # an empty bin counts as this share (PSI is infinite otherwise)
P_COLUMN = f"p_{POSITIVE}"
REQUIRED = ("file", "label", P_COLUMN, "out_of_distribution", "error", "model")
IMAGE_COLUMNS = ("image_width", "image_height", "bit_depth", "image_mode")  # optional: files since the image facts


@dataclass(frozen=True)
class _Row:
    p_covid: float | None
    answered: bool
    ood: bool
    threshold: float | None
    error: bool
    width: int | None = None  # the file's own size, bit depth and mode, where the predictions file has them
    height: int | None = None
    bit_depth: int | None = None
    mode: str | None = None
    day: date | None = None  # the date in the --by-date column


@dataclass(frozen=True)
class ImageReference:
    """The calibration images' own widths and heights (sorted) and their counts per bit depth and per mode."""

    widths: np.ndarray
    heights: np.ndarray
    bit_depths: dict[str, int]
    modes: dict[str, int]


# ---------------------------------------------------------------------------------------------------
# Statistics (numpy only)
# ---------------------------------------------------------------------------------------------------


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution (``scipy.stats.kstwobign.sf``): the alternating series
    2 Σ (-1)^(k-1) exp(-2k²x²) for x ≥ 1, one minus the Jacobi-theta form of the CDF below 1 (both converge
    in a few terms there)."""
    if x <= 0:
        return 1.0
    k = np.arange(1, 101, dtype=np.float64)
    if x < 1.0:
        cdf = math.sqrt(2 * math.pi) / x * np.sum(np.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * x * x)))
        return float(min(max(1.0 - cdf, 0.0), 1.0))
    sf = 2 * np.sum((-1) ** (k - 1) * np.exp(-2 * k * k * x * x))
    return float(min(max(sf, 0.0), 1.0))


def ks_two_sample(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """The two-sample Kolmogorov–Smirnov statistic D (largest gap between the two empirical CDFs, as
    ``scipy.stats.ks_2samp``) and its asymptotic two-sided p-value, with Stephens' small-sample correction."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if not len(a) or not len(b):
        raise ValueError("ks_two_sample needs two non-empty samples")
    both = np.concatenate([a, b])
    gap = np.searchsorted(a, both, side="right") / len(a) - np.searchsorted(b, both, side="right") / len(b)
    d = float(np.max(np.abs(gap)))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``: Σ (a − e)·ln(a / e) over bins cut at
    the reference's quantiles (deciles by default; tied cut points merged), each share floored at
    ``PSI_FLOOR``."""
    reference, current = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    edges = np.unique(np.quantile(reference, np.arange(1, bins) / bins))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    e = np.maximum(expected / len(reference), PSI_FLOOR)
    a = np.maximum(actual / len(current), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


# ---------------------------------------------------------------------------------------------------
# Reading predictions and the site file
# ---------------------------------------------------------------------------------------------------


def _date(value: object, where: str, column: str) -> date:
    """A cell of the --by-date column as a date (ISO 8601; a date-time gives its own calendar date)."""
    text = "" if value is None else str(value).strip()
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        raise CovidxrError(
            f"{where}: column {column!r} holds {text!r}, not a date (ISO 8601, e.g. 2024-03-01, 20240301 or "
            "2024-03-01T14:30:00)"
        ) from None


def _image_facts(row: dict, where: str) -> dict:
    """A row's ``image_width``, ``image_height``, ``bit_depth`` and ``image_mode`` (empty where the file lacks
    the columns or the row its values)."""
    if any(row.get(column) in (None, "") for column in IMAGE_COLUMNS):
        return {}
    try:
        facts = {key: int(row[key]) for key in ("image_width", "image_height", "bit_depth")}
    except (TypeError, ValueError):
        raise CovidxrError(f"{where}: damaged (image_width, image_height or bit_depth is not a whole number)") from None
    if min(facts.values()) < 1:
        raise CovidxrError(f"{where}: damaged (image_width, image_height or bit_depth below 1)")
    width, height, bits = facts["image_width"], facts["image_height"], facts["bit_depth"]
    return {"width": width, "height": height, "bit_depth": bits, "mode": str(row["image_mode"])}


def _make_row(path: Path, number: int, row: dict, by_date: str | None = None) -> _Row:
    """One prediction row checked and typed; anything damaged is one line naming the file and row (and, with
    ``by_date``, the column where its date is missing or not a date)."""
    where = f"{path} row {number}"
    if not str(row.get("file") or "") or not str(row.get("model") or ""):
        raise CovidxrError(f"{where}: damaged (no file or no model)")
    day = None
    if by_date is not None:
        if by_date not in row:
            raise CovidxrError(f"{where}: no column {by_date!r} (the dates --by-date names)")
        day = _date(row[by_date], where, by_date)
    if str(row.get("error") or ""):
        return _Row(None, False, False, None, True, day=day)
    try:
        p = float(row[P_COLUMN])
        threshold = row.get("covid_threshold")
        threshold = float(threshold) if threshold not in (None, "") else None
    except (TypeError, ValueError):
        raise CovidxrError(f"{where}: damaged ({P_COLUMN} or covid_threshold is not a number)") from None
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise CovidxrError(f"{where}: damaged ({P_COLUMN} {p} outside [0, 1])")
    flag = row.get("out_of_distribution")
    if flag not in (True, False, None, "True", "False", ""):
        raise CovidxrError(f"{where}: damaged (out_of_distribution {flag!r} is not True, False or empty)")
    return _Row(
        p, bool(row.get("label")), flag in (True, "True"), threshold, False, **_image_facts(row, where), day=day
    )


def _csv_rows(path: Path, text: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text))
    try:
        records = list(reader)
    except csv.Error as exc:
        raise CovidxrError(f"{path}: damaged (malformed CSV: {exc})") from None
    if not records:
        raise CovidxrError(f"{path}: empty (no header, no rows); write predictions with `covidxr predict --out`")
    header = records[0]
    missing = [column for column in REQUIRED if column not in header]
    if missing:
        raise CovidxrError(
            f"{path}: not a covidxr predictions file (no column {', '.join(missing)}); "
            "write one with `covidxr predict DIR --out FILE.csv`"
        )
    rows = []
    for number, record in enumerate(records[1:], start=2):
        if len(record) != len(header):
            raise CovidxrError(f"{path} row {number}: damaged ({len(record)} fields, the header has {len(header)})")
        rows.append(dict(zip(header, map(text_from_spreadsheet, record), strict=True)))  # '=x.png: =x.png
    return rows


def _parquet_rows(path: Path) -> list[dict]:
    """The rows of a Parquet predictions file, typed as the writer wrote them (``covidxr.runtime.writer``)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CovidxrError(f"{path}: reading Parquet needs pyarrow: pip install 'covidxr[parquet]'") from None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise CovidxrError(f"{path}: predictions file not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise CovidxrError(f"{path}: damaged or not a Parquet file ({type(exc).__name__})") from None
    missing = [column for column in REQUIRED if column not in table.column_names]
    if missing:
        raise CovidxrError(
            f"{path}: not a covidxr predictions file (no column {', '.join(missing)}); "
            "write one with `covidxr predict DIR --out FILE.parquet`"
        )
    return table.to_pylist()


def _json_rows(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CovidxrError(f"{path}: damaged (not complete JSON: {exc})") from None
    rows = data.get("predictions") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise CovidxrError(
            f"{path}: not a covidxr predictions file (no list of predictions); "
            "write one with `covidxr predict DIR --out FILE.json`"
        )
    for number, row in enumerate(rows, start=1):
        missing = [column for column in REQUIRED if column not in row]
        if missing:
            raise CovidxrError(f"{path} row {number}: damaged (no {', '.join(missing)})")
    return rows


def read_predictions(paths: Sequence[str | Path], by_date: str | None = None) -> tuple[list[_Row], str]:
    """The rows of ``predict --out`` files, in order, and the one model that made them all; an unreadable,
    empty or damaged file, or rows from a second model, is refused in one line naming the file and row. With
    ``by_date``, every row's date is read from that column (a missing or bad date: one line naming the row)."""
    rows: list[_Row] = []
    model: str | None = None
    first_at = ""
    for path in map(Path, paths):
        if path.suffix not in {".csv", ".json", ".parquet"}:
            raise CovidxrError(
                f"{path}: predictions must be a .csv, .json or .parquet file written by `covidxr predict --out`"
            )
        if path.suffix == ".parquet":
            raw = _parquet_rows(path)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise CovidxrError(f"{path}: predictions file not found") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise CovidxrError(f"{path}: cannot be read ({type(exc).__name__})") from None
            if not text.strip():
                raise CovidxrError(
                    f"{path}: empty (no header, no rows); write predictions with `covidxr predict --out`"
                )
            raw = _json_rows(path, text) if path.suffix == ".json" else _csv_rows(path, text)
        if not raw:
            raise CovidxrError(f"{path}: has no prediction rows")
        first_row = 2 if path.suffix == ".csv" else 1
        for number, row in enumerate(raw, start=first_row):
            rows.append(_make_row(path, number, row, by_date))
            if model is None:
                model, first_at = str(row["model"]), f"{path} row {number}"
            elif str(row["model"]) != model:
                raise CovidxrError(
                    f"{path} row {number}: made by another model ({row['model']}) than {first_at} ({model}); "
                    "monitor one model's predictions at a time"
                )
    if model is None:
        raise CovidxrError("no predictions files given")
    return rows, model


def _identity_field(identity: str, key: str) -> str | None:
    match = re.search(rf"(?:^|\s){key}=([0-9a-f]+)(?:\s|$)", identity)
    return match.group(1) if match else None


def check_site_model(site: SiteCalibration, identity: str) -> None:
    """Refuse a site file made for another model than the predictions' (``writer.model_identity``: head hash
    and preprocessing key, both abbreviated); one the identity cannot be checked against is only warned of."""
    head, preprocessing = _identity_field(identity, "head"), _identity_field(identity, "preprocessing")
    if head is None and preprocessing is None:
        logger.warning("the predictions' model (%s) cannot be checked against %s", identity, site.path)
        return
    same_head = head is None or site.model["head_sha256"].startswith(head)
    same_key = preprocessing is None or stable_digest(site.model["model_key"]).startswith(preprocessing)
    if not (same_head and same_key):
        raise CovidxrError(
            f"{site.path}: calibrated for another model ({site.model.get('name')}/{site.model.get('run')}, head "
            f"{site.model['head_sha256'][:12]}) than the one that made the predictions ({identity}); "
            "monitor with the site file of that model"
        )


def answer_row(answer: dict) -> _Row:
    """One answer of the Python API or the service (``label``, ``probabilities``, ``out_of_distribution``,
    ``covid_threshold``) as a row of a window, as ``read_predictions`` makes one from a predictions file."""
    return _Row(
        None if answer["probabilities"][POSITIVE] is None else float(answer["probabilities"][POSITIVE]),
        bool(answer.get("label")),
        bool(answer.get("out_of_distribution")),
        answer.get("covid_threshold"),
        False,
    )


def calibration_reference(site: SiteCalibration) -> tuple[np.ndarray, MonitorFigures]:
    """The calibration images' p(COVID-19) and shares; a site file written before they were kept is refused."""
    return _reference(site)


def _reference(site: SiteCalibration) -> tuple[np.ndarray, MonitorFigures]:
    """The calibration images' p(COVID-19) and shares; a site file written before they were kept is refused."""
    inputs = site.inputs if isinstance(site.inputs, dict) else {}
    keys = ("p_covid", "ood_rate", "no_answer_rate", "covid_share")
    if any(inputs.get(key) is None for key in keys):
        raise CovidxrError(
            f"{site.path}: lacks the calibration distributions that monitor compares with (written by an older "
            "covidxr); make the site file again with `covidxr calibrate`"
        )
    try:
        values = np.asarray(inputs["p_covid"], dtype=np.float64)
        figures = MonitorFigures(
            n=len(values),
            ood_rate=float(inputs["ood_rate"]),
            no_answer_rate=float(inputs["no_answer_rate"]),
            covid_share=float(inputs["covid_share"]),
        )
    except (TypeError, ValueError):
        raise CovidxrError(f"{site.path}: damaged (the calibration distributions are not numbers)") from None
    if not len(values) or not np.all(np.isfinite(values)):
        raise CovidxrError(f"{site.path}: damaged (no finite calibration p(COVID-19) values)")
    return values, figures


def image_reference(site: SiteCalibration) -> ImageReference | None:
    """The calibration images' own sizes, bit depths and modes; ``None`` for a site file written before they
    were kept (the other figures are still compared)."""
    inputs = site.inputs if isinstance(site.inputs, dict) else {}
    keys = ("image_widths", "image_heights", "bit_depths", "modes")
    if not all(inputs.get(key) for key in keys):
        return None
    try:
        reference = ImageReference(
            np.asarray(inputs["image_widths"], dtype=np.float64),
            np.asarray(inputs["image_heights"], dtype=np.float64),
            {str(k): int(v) for k, v in dict(inputs["bit_depths"]).items()},
            {str(k): int(v) for k, v in dict(inputs["modes"]).items()},
        )
    except (TypeError, ValueError):
        raise CovidxrError(f"{site.path}: damaged (the calibration images' sizes or bit depths)") from None
    if reference.widths.ndim != 1 or len(reference.widths) != len(reference.heights):
        raise CovidxrError(f"{site.path}: damaged (the calibration images' widths and heights differ in number)")
    return reference


def period_of(day: date, period: str) -> str:
    """The period a date falls in: ``2024-03-01`` (day), ``2024-W09`` (ISO week), ``2024-03`` (month)."""
    if period == "day":
        return day.isoformat()
    if period == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return f"{day.year}-{day.month:02d}"
    raise CovidxrError(f"--period must be one of {', '.join(PERIODS)}, not {period!r}")


# ---------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------


def _total_variation(reference: dict[str, int], values: Sequence[str]) -> float:
    """Half the summed absolute difference between the shares of each value in ``values`` and ``reference``."""
    total = sum(reference.values())
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    keys = set(reference) | set(counts)
    return 0.5 * sum(abs(counts.get(k, 0) / len(values) - reference.get(k, 0) / total) for k in keys)


def image_shift(rows: Sequence[_Row], images: ImageReference) -> tuple[float, float, float] | None:
    """The window's image sizes against calibration's (the larger KS D of widths and heights, and its p-value)
    and its bit depths and modes (the larger total variation distance); ``None`` when a row lacks them."""
    if not rows or any(row.width is None for row in rows):
        return None
    widths = ks_two_sample(images.widths, [row.width for row in rows])
    heights = ks_two_sample(images.heights, [row.height for row in rows])
    d, pvalue = max(widths, heights, key=lambda pair: (pair[0], -pair[1]))
    shift = max(
        _total_variation(images.bit_depths, [str(row.bit_depth) for row in rows]),
        _total_variation(images.modes, [str(row.mode) for row in rows]),
    )
    return d, pvalue, shift


def shares(rows: Sequence[_Row], threshold: float) -> tuple[float, float, float | None]:
    """The OOD rate, the no-answer rate and the share of answered images called COVID-19 at ``threshold``
    (``None`` when none was answered) of readable rows."""
    p = np.round(np.array([row.p_covid for row in rows], dtype=np.float64), DECIMALS)
    answered = np.array([row.answered for row in rows])
    ood = float(np.mean([row.ood for row in rows]))
    no_answer = float(1 - answered.mean())
    covid_share = float((p[answered] >= threshold).mean()) if answered.any() else None
    return ood, no_answer, covid_share


def compare_window(
    index: int,
    first: int,
    rows: Sequence[_Row],
    reference: np.ndarray,
    calibration: MonitorFigures,
    threshold: float,
    images: ImageReference | None = None,
    last: int | None = None,
    period: str | None = None,
) -> MonitorWindow:
    """One window of readable rows against the calibration images: its shares, PSI and KS of p(COVID-19), with
    ``images`` its image sizes, bit depths and modes (where every row has them), and the rules (``RULES``) it
    broke. ``first`` and ``last`` (default: consecutive rows) are its first and last row; ``period`` its date
    period."""
    p = np.round(np.array([row.p_covid for row in rows], dtype=np.float64), DECIMALS)
    ood, no_answer, covid_share = shares(rows, threshold)
    shift = psi(reference, p)
    d, pvalue = ks_two_sample(reference, p)
    alarms = []
    if shift >= RULES["psi"]:
        alarms.append(f"PSI {shift:.3f} ≥ {RULES['psi']}")
    if pvalue < RULES["ks_pvalue"] and d >= RULES["ks_statistic"]:
        alarms.append(f"KS {d:.3f} ≥ {RULES['ks_statistic']} with p {pvalue:.1e} < {RULES['ks_pvalue']}")
    for name, value, reference_value in (
        ("OOD rate", ood, calibration.ood_rate),
        ("no-answer rate", no_answer, calibration.no_answer_rate),
    ):
        limit = RULES["ood_rate_rise" if name == "OOD rate" else "no_answer_rate_rise"]
        if value - reference_value > limit + 1e-12:
            alarms.append(f"{name} {value:.1%} > calibration's {reference_value:.1%} + {100 * limit:.0f} points")
    size_d = size_p = format_shift = None
    measured = None if images is None else image_shift(rows, images)
    if measured is not None:
        size_d, size_p, format_shift = measured
        if size_p < RULES["size_ks_pvalue"] and size_d >= RULES["size_ks_statistic"]:
            alarms.append(
                f"image sizes KS {size_d:.3f} ≥ {RULES['size_ks_statistic']} with p {size_p:.1e} < "
                f"{RULES['size_ks_pvalue']}"
            )
        if format_shift > RULES["format_shift"] + 1e-12:
            alarms.append(
                f"bit depth or mode shares moved {format_shift:.1%} > {100 * RULES['format_shift']:.0f} points"
            )
    return MonitorWindow(
        index=index,
        first=first,
        last=first + len(rows) - 1 if last is None else last,
        period=period,
        size_ks_statistic=size_d,
        size_ks_pvalue=size_p,
        format_shift=format_shift,
        n=len(rows),
        ood_rate=ood,
        no_answer_rate=no_answer,
        covid_share=covid_share,
        psi=shift,
        ks_statistic=d,
        ks_pvalue=pvalue,
        alarms=alarms,
    )


def monitor_predictions(
    predictions: Sequence[str | Path],
    site: str | Path,
    window: int = 500,
    by_date: str | None = None,
    period: str = "week",
) -> MonitorReport:
    """Compare consecutive windows of ``window`` predictions (``predict --out`` files, in order, one model), or
    with ``by_date`` one window per ``period`` of the dates in that column, with the calibration images of
    ``site`` (that model's site file); the report, verdict ``ALARM`` when any window broke a rule (``RULES``)."""
    if window < 4:
        raise CovidxrError(f"--window must be at least 4 images, not {window}")
    if by_date is not None:
        period_of(date.today(), period)  # an unknown period: one line before anything is read
    rows, identity = read_predictions(predictions, by_date)
    calibration_site = load_site(site)
    check_site_model(calibration_site, identity)
    reference, calibration = _reference(calibration_site)
    images = image_reference(calibration_site)
    threshold = calibration_site.covid_threshold
    readable = [row for row in rows if not row.error]
    used = {row.threshold for row in readable} - {None}
    if used and any(abs(t - threshold) > 1e-9 for t in used):
        logger.warning(
            "the predictions were decided at COVID-19 threshold(s) %s, not the site's %.4f (predict --site %s?); "
            "the COVID-19 share is counted at the site's",
            ", ".join(f"{t:.4f}" for t in sorted(used)),
            threshold,
            site,
        )
    if by_date is not None:
        windows, skipped = _date_windows(readable, reference, calibration, threshold, images, period)
    else:
        windows, skipped = _count_windows(readable, reference, calibration, threshold, images, window)
    return MonitorReport.new(
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "predictions": [str(p) for p in predictions],
            "site_file": str(site),
            "site": calibration_site.site,
            "model": identity,
            "window": 0 if by_date is not None else window,
            "by_date": by_date,
            "period": period if by_date is not None else None,
            "skipped": skipped,
            "unreadable": len(rows) - len(readable),
            "images_compared": images is not None and any(w.size_ks_statistic is not None for w in windows),
            "rules": {**RULES, "covid_threshold": threshold, "psi_bins": "calibration p(COVID-19) deciles"},
            "calibration": calibration.to_dict(),
            "windows": [w.to_dict() for w in windows],
            "verdict": "ALARM" if any(w.alarms for w in windows) else "OK",
            "disclaimer": DISCLAIMER,
        }
    )


def _count_windows(
    readable: list[_Row],
    reference: np.ndarray,
    calibration: MonitorFigures,
    threshold: float,
    images: ImageReference | None,
    window: int,
) -> tuple[list[MonitorWindow], str | None]:
    """Consecutive windows of ``window`` rows; a last one under a quarter of a window is skipped (and said)."""
    minimum = max(1, math.ceil(MIN_WINDOW_SHARE * window))
    if len(readable) < minimum:
        raise CovidxrError(
            f"{len(readable)} readable prediction(s): fewer than a quarter of a window ({minimum} of --window "
            f"{window}); give more predictions or a smaller --window"
        )
    windows, skipped = [], None
    for start in range(0, len(readable), window):
        chunk = readable[start : start + window]
        if len(chunk) < minimum:
            skipped = (
                f"the last {len(chunk)} image(s) (rows {start + 1}–{start + len(chunk)}) are skipped: fewer than a "
                f"quarter of a window ({minimum})"
            )
            break
        windows.append(compare_window(len(windows) + 1, start + 1, chunk, reference, calibration, threshold, images))
    return windows, skipped


def _date_windows(
    readable: list[_Row],
    reference: np.ndarray,
    calibration: MonitorFigures,
    threshold: float,
    images: ImageReference | None,
    period: str,
) -> tuple[list[MonitorWindow], str | None]:
    """One window per period of the rows' dates, in date order (rows ``first``..``last``: the first and last
    row of the period, over all files in order); a period under ``MIN_PERIOD_IMAGES`` rows is skipped (and said)."""
    groups: dict[str, list[int]] = {}
    for position, row in enumerate(readable):
        groups.setdefault(period_of(row.day, period), []).append(position)
    windows, short = [], []
    for key in sorted(groups):
        positions = groups[key]
        if len(positions) < MIN_PERIOD_IMAGES:
            short.append(f"{key} ({len(positions)})")
            continue
        chunk = [readable[i] for i in positions]
        windows.append(
            compare_window(
                len(windows) + 1,
                positions[0] + 1,
                chunk,
                reference,
                calibration,
                threshold,
                images,
                last=positions[-1] + 1,
                period=key,
            )
        )
    skipped = None
    if short:
        skipped = (
            f"{len(short)} {period}(s) skipped, fewer than {MIN_PERIOD_IMAGES} readable images each: "
            + ", ".join(short[:10])
            + (f" and {len(short) - 10} more" if len(short) > 10 else "")
        )
    if not windows:
        raise CovidxrError(
            f"no {period} holds {MIN_PERIOD_IMAGES} readable predictions or more ({', '.join(short[:5])}"
            f"{' …' if len(short) > 5 else ''}); give more predictions or a longer --period"
        )
    return windows, skipped


def describe_window(window: MonitorWindow, calibration: MonitorFigures) -> str:
    """One line: a window's figures beside calibration's, and OK or ALARM with the rules it broke."""
    share = "—" if window.covid_share is None else f"{window.covid_share:.1%}"
    where = f"images {window.first}–{window.last}" if window.period is None else window.period
    images = ""
    if window.size_ks_statistic is not None:
        images = (
            f"image sizes KS {window.size_ks_statistic:.3f} (p {window.size_ks_pvalue:.2g}), "
            f"bit depth/mode shift {window.format_shift:.1%}, "
        )
    line = (
        f"window {window.index} ({where}, n={window.n}): "
        f"PSI {window.psi:.3f}, KS {window.ks_statistic:.3f} (p {window.ks_pvalue:.2g}), "
        f"OOD {window.ood_rate:.1%} (calibration {calibration.ood_rate:.1%}), "
        f"no answer {window.no_answer_rate:.1%} (calibration {calibration.no_answer_rate:.1%}), "
        f"called COVID-19 {share} (calibration {calibration.covid_share:.1%}), {images}"
    )
    line = line.removesuffix(", ") + ": "
    return line + (f"ALARM: {'; '.join(window.alarms)}" if window.alarms else "OK")


# ---------------------------------------------------------------------------------------------------
# Writing: monitor.json and monitor.png
# ---------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one bitmap size
        return ImageFont.load_default()


def _nice_step(top: float) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) such that four steps reach ``top``."""
    power = 10 ** math.floor(math.log10(top / 4))
    return next(power * m for m in (1, 2, 2.5, 5, 10) if power * m * 4 >= top)


def _panel(
    image: Image.Image,
    box: tuple[int, int, int, int],
    values: list[float],
    flagged: list[bool],
    limit: float,
    limit_label: str,
    title: str,
    ylabel: str,
    percent: bool = False,
    reference: float | None = None,
    names: list[str] | None = None,
) -> None:
    """One plot: a value per window (red where that window alarmed on this figure), a dashed alarm line."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    small, text = _font(13), _font(15)
    step = _nice_step(max([*values, limit, reference or 0.0]) * 1.1 or 1.0)
    top_value = step * 4
    draw.text((left, top - 26), title, fill="black", font=text)
    draw.rectangle(box, outline="black")

    def y(value: float) -> float:
        return bottom - (value / top_value) * (bottom - top)

    def x(i: int) -> float:
        return left + (i + 0.5) / len(values) * (right - left)

    for tick in np.arange(5) * step:
        draw.line([(left - 5, y(tick)), (left, y(tick))], fill="black")
        label = f"{100 * tick:g}%" if percent else f"{tick:g}"
        draw.text((left - 8, y(tick)), label, fill="black", font=small, anchor="rm")
    every = max(1, math.ceil(len(values) / (20 if names is None else 8)))
    for i in range(0, len(values), every):
        draw.line([(x(i), bottom), (x(i), bottom + 5)], fill="black")
        draw.text((x(i), bottom + 8), str(i + 1) if names is None else names[i], fill="black", font=small, anchor="mt")

    def dashed(value: float, colour: str) -> None:
        position = left
        while position < right:
            draw.line([(position, y(value)), (min(position + 8, right), y(value))], fill=colour, width=2)
            position += 14

    dashed(limit, "#c0392b")
    draw.text((right - 4, y(limit) - 3), limit_label, fill="#c0392b", font=small, anchor="rb")
    if reference is not None:
        dashed(reference, "#7f8c8d")
        draw.text((left + 4, y(reference) - 3), "calibration", fill="#7f8c8d", font=small, anchor="lb")
    points = [(x(i), y(v)) for i, v in enumerate(values)]
    if len(points) > 1:
        draw.line(points, fill="#2c3e50", width=2)
    for (px, py), alarm in zip(points, flagged, strict=True):
        colour = "#c0392b" if alarm else "#2471a3"
        draw.ellipse([(px - 5, py - 5), (px + 5, py + 5)], fill=colour, outline="black")
    label = Image.new("RGB", (bottom - top, 20), "white")
    ImageDraw.Draw(label).text(((bottom - top) / 2, 10), ylabel, fill="black", font=text, anchor="mm")
    image.paste(label.rotate(90, expand=True), (left - 78, top))


def draw_monitor(report: MonitorReport, path: str | Path) -> Path:
    """``monitor.png``: the PSI of p(COVID-19) and the OOD rate per window, with their alarm limits."""
    width, height = 1000, 720
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if report.by_date is None:
        windows_are = f"{len(report.windows)} window(s) of {report.window} images"
        axis = f"window (consecutive images, {report.window} per window, in order)"
        names = None
    else:
        windows_are = f"{len(report.windows)} {report.period}(s) of column {report.by_date}"
        axis = f"{report.period} of the dates in column {report.by_date}, in date order"
        names = [str(w.period) for w in report.windows]
    draw.text(
        (20, 14),
        f"covidxr monitor: {report.site} - {windows_are} - {report.verdict}",
        fill="#c0392b" if report.verdict == "ALARM" else "black",
        font=_font(18),
    )
    windows = report.windows
    ood_limit = report.calibration.ood_rate + RULES["ood_rate_rise"]
    _panel(
        image,
        (110, 90, width - 30, 330),
        [w.psi for w in windows],
        [any(a.startswith("PSI") for a in w.alarms) for w in windows],
        RULES["psi"],
        f"alarm: PSI >= {RULES['psi']}",
        "p(COVID-19) against the calibration images: PSI (10 bins at calibration deciles)",
        "PSI",
        names=names,
    )
    _panel(
        image,
        (110, 400, width - 30, 640),
        [w.ood_rate for w in windows],
        [any(a.startswith("OOD") for a in w.alarms) for w in windows],
        ood_limit,
        "alarm: calibration + 10 points",
        "Share of images flagged out of distribution (OOD rate)",
        "OOD rate",
        percent=True,
        reference=report.calibration.ood_rate,
        names=names,
    )
    draw.text(
        ((110 + width - 30) / 2, 666),
        axis,
        fill="black",
        font=_font(15),
        anchor="mt",
    )
    draw.text((20, height - 24), DISCLAIMER, fill="#555555", font=_font(14))
    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write(path, buffer.getvalue())


def write_monitor(report: MonitorReport, out: str | Path) -> tuple[Path, Path]:
    """``out/monitor.json`` and ``out/monitor.png`` (the folder is made where missing)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CovidxrError(f"{out}: cannot make the output folder ({exc.strerror or type(exc).__name__})") from None
    record = atomic_write(out / "monitor.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return record, draw_monitor(report, out / "monitor.png")
