"""The runtime's commands: predict, serve, explain, segment, model-card and monitor (no torch)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from covidxr import DISCLAIMER
from covidxr.cli.options import (
    _path,
    _progress,
    cli,
    model_options,
    pattern_option,
    prediction_engine_options,
    weights_options,
)


def _prediction_table(results: list[dict]) -> str:
    """One aligned line per image: file name, label, p(COVID-19), and a flag (no answer, or the error)."""
    from covidxr.runtime.site import describe_set

    rows = [("file", "label", "p(COVID-19)", "flag")]
    for result in results:
        name = Path(result["file"]).name
        if "error" in result:
            rows.append((name, "ERROR", "", result["error"]))
        elif result["label"] is None:
            p = result["probabilities"]["COVID-19"]
            rows.append((name, "-", "-" if p is None else f"{p:.3f}", f"{result['no_answer_reason']}: no answer"))
        else:
            members = result.get("prediction_set")
            flag = "" if members is None else f"set {describe_set(members)}"
            rows.append((name, result["label"], f"{result['probabilities']['COVID-19']:.3f}", flag))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip() for row in rows
    )


site_option = click.option(
    "--site",
    type=_path,
    default=None,
    help="site.json from `covidxr calibrate` for this model: its COVID-19 threshold decides instead of the model's.",
)

spec_option = click.option(
    "--spec",
    type=_path,
    default=None,
    help="The spec (MODEL.yaml) of a foreign --model MODEL.onnx (default: the .yaml beside the graph).",
)
FOREIGN_MODEL_HELP = (
    "Run folder of a trained model, or a foreign MODEL.onnx with its spec (default: the bundled model)."
)


def _foreign_model(run, spec, site, engine, threads):
    """The foreign model ``--model MODEL.onnx`` (``--spec``) names, or None for a covidxr run folder; ``--site``
    and a torch or int8 ``--engine`` are refused in one line for a foreign model."""
    from covidxr.runtime.api import load_model
    from covidxr.runtime.foreign import is_foreign_model

    if not is_foreign_model(run, spec):
        return None
    if run is None:
        raise click.ClickException("--spec describes a foreign model: give its graph too, --model MODEL.onnx")
    return load_model(run, engine, threads=threads, site=site, spec=spec)


@cli.command("predict", short_help="Label chest X-rays: files, folders (CSV/JSON out).")
# No readability check here: an unreadable file becomes its own error row and the others still run.
@click.argument("images", type=click.Path(path_type=Path, readable=False), nargs=-1, required=True)
@click.option("--model", "run", type=_path, default=None, help=FOREIGN_MODEL_HELP)
@spec_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option(
    "--out",
    type=_path,
    default=None,
    help="Write one row per image to this .csv or .json, chunk by chunk (folders are searched recursively).",
)
@click.option("--resume", is_flag=True, help="Complete an existing --out file without redoing its rows.")
@click.option("--chunk-size", type=click.IntRange(1), default=256, show_default=True, help="Images per write.")
@pattern_option
@site_option
@prediction_engine_options
@model_options
def predict_command(
    images,
    run,
    spec,
    as_json,
    out,
    resume,
    chunk_size,
    patterns,
    site,
    engine,
    threads,
    weights,
    weights_dir,
    cache_dir,
):
    """Predict the class of each image (files or folders); bad files are reported and skipped (exit 1 if any).

    --model MODEL.onnx predicts with a model covidxr did not train, described by its spec (MODEL.yaml beside it,
    or --spec): the same columns and one answer per image, without covidxr's out-of-distribution guard."""
    from covidxr.runtime.calibration import describe_operating_point
    from covidxr.runtime.inference import expand_inputs, predict_files
    from covidxr.runtime.runners import make_engine
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.site import describe_site, with_site
    from covidxr.runtime.writer import predict_to_file

    images = expand_inputs(images, patterns)  # before the model loads: an empty folder is one line, at once
    foreign = _foreign_model(run, spec, site, engine, threads)
    if foreign is None:
        loaded = with_site(load_run(run or default_model_path(), weights, weights_dir), site)
        runner = make_engine(loaded, engine, cache_dir, threads)
    else:
        loaded, runner = foreign, engine
    if out is not None:
        try:
            rows, new = predict_to_file(
                loaded, images, out, resume, cache_dir, progress=_progress(), chunk_size=chunk_size, engine=runner
            )
        except KeyboardInterrupt:  # Ctrl-C or SIGINT: one line, and 128 + SIGINT as a shell expects
            click.echo(f"Error: interrupted; the finished rows are in {out}: rerun with --resume", err=True)
            click.get_current_context().exit(130)
        errors = [row for row in rows if row["error"]]
        for row in errors:
            click.echo(f"ERROR {row['error']}", err=True)
        flagged = sum(bool(row["out_of_distribution"]) for row in rows)
        guard = "no out-of-distribution guard (a foreign model)" if foreign else f"{flagged} out-of-distribution"
        labels = [row["label"] or "no answer" for row in rows if not row["error"]]
        counts = dict(Counter(labels).most_common())
        click.echo(
            f"{len(rows)} image(s) → {out}: {', '.join(f'{k} {v}' for k, v in counts.items()) or 'none readable'}; "
            f"{guard}; {len(errors)} unreadable "
            f"({len(rows) - new} were already done)\n{DISCLAIMER}"
        )
        if errors:
            raise click.ClickException(f"{len(errors)} of {len(rows)} file(s) could not be read")
        return
    if foreign is not None:
        results = foreign.predict_files(images)
    else:
        results = predict_files(loaded, images, cache_dir, progress=_progress(), engine=runner)
    if len(results) == 1 and "error" in results[0] and not as_json:
        raise click.ClickException(results[0]["error"])  # one image that cannot be read: one line
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(_prediction_table(results))
        if foreign is not None:
            decision = f"label: {foreign.describe_decision()}; a foreign model, without out-of-distribution guard"
        else:
            if loaded.site is None:
                rule = describe_operating_point(loaded.info.threshold_record)
            else:
                rule = f"{describe_site(loaded.site)}; site file {loaded.site.path}"
            decision = (
                f"label: COVID-19 when p(COVID-19) reaches {loaded.covid_threshold:.3f} ({rule}), otherwise "
                "the more probable other class"
            )
        click.echo(f"{decision}; full paths with --json or --out.\n" + DISCLAIMER)
    failures = sum("error" in r for r in results)
    if failures:
        raise click.ClickException(f"{failures} of {len(results)} file(s) could not be read")


@cli.command("serve", short_help="Serve the web page and the JSON API.")
@click.option("--model", "run", type=_path, default=None, help=FOREIGN_MODEL_HELP)
@spec_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (the default: this machine only)."
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@prediction_engine_options
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Requests that may wait for the model; one more gets HTTP 503 with Retry-After.",
)
@click.option(
    "--monitor-window",
    type=click.IntRange(4),
    default=500,
    show_default=True,
    help="Answers the live input monitor keeps (the last ones given; /healthz and /monitor).",
)
@site_option
@model_options
def serve_command(
    run, spec, host, port, engine, threads, max_queue, monitor_window, site, weights, weights_dir, cache_dir
):
    """Serve the page and the JSON API (POST /api/predict, /api/explain; GET /api/model, /healthz, /docs) and
    the input monitor over the last answers (/monitor).

    --model MODEL.onnx serves a model covidxr did not train (its spec beside it, or --spec): the same answers,
    without out-of-distribution guard, and /api/explain answers without a heat map (Grad-CAM needs a run)."""
    from covidxr.runtime.api import ForeignModel, Model
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.serve import serve
    from covidxr.runtime.site import describe_site, with_site

    model = _foreign_model(run, spec, site, engine, threads)
    if model is None:
        model = Model(
            with_site(load_run(run or default_model_path(), weights, weights_dir), site), engine, cache_dir, threads
        )
    if model.site is not None:
        click.echo(
            f"covidxr: {describe_site(model.site)} ({site}): COVID-19 threshold {model.covid_threshold:.3f}",
            err=True,
        )
    name = model.path.name if isinstance(model, ForeignModel) else model.run.path.name
    click.echo(f"covidxr: serving {name} on http://{host}:{port}/ ({DISCLAIMER})", err=True)
    serve(model, host, port, max_queue, monitor_window)


@cli.command("model-card", short_help="Show a run's model card (default: the bundled).")
@click.argument("run", type=_path, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown.")
def model_card_command(run, as_json):
    """The model card of a run folder (default: the bundled model): data, confounders, metrics, audit, failures."""
    from covidxr.runtime.card import model_card, render_model_card
    from covidxr.runtime.runs import default_model_path

    card = model_card(run or default_model_path())
    click.echo(json.dumps(card, indent=2) if as_json else render_model_card(card))


@cli.command("explain", short_help="Heat maps of the answer: files or folders.")
@click.argument("images", type=_path, nargs=-1, required=True)
@click.option(
    "--model", "run", type=_path, default=None, help="Run folder of a trained model (default: the bundled model)."
)
@click.option(
    "--method",
    type=click.Choice(["gradcam", "gradcam++", "scorecam", "eigencam"]),
    default="gradcam",
    show_default=True,
)
@click.option(
    "--out",
    type=_path,
    default=Path("explanations"),
    show_default=True,
    help="Folder for <image>.<method>.png (overlay) and .npy (raw map), and contact-sheet.<method>.png.",
)
@pattern_option
@weights_options
def explain_command(images, run, method, out, patterns, weights, weights_dir):
    """Class activation maps: an overlay PNG and the raw map per image; bad files are reported and skipped."""
    from covidxr.runtime.api import load_model
    from covidxr.runtime.inference import expand_inputs

    images = expand_inputs(images, patterns)
    model = load_model(run, weights=weights, weights_dir=weights_dir)
    results = model.explain_files(images, out, method)
    for result in results:
        if "error" in result:
            click.echo(f"{result['file']}: ERROR {result['error']}")
        else:
            share = result["lung_share"]
            inside = "lungs not found" if share is None else f"{share:.0%} of the map inside the lungs"
            reason = result["no_answer_reason"]
            which = "the label" if result["label"] else f"the most probable class (no answer: {reason})"
            click.echo(
                f"{result['file']}: map of {which}, {result['target']} (p={result['probability']:.3f}), "
                f"{inside} → {result['overlay']}"
            )
    click.echo(DISCLAIMER)
    failures = sum("error" in r for r in results)
    if failures:
        raise click.ClickException(f"{failures} of {len(results)} file(s) could not be explained")


@cli.command("segment", short_help="Lung masks of files or folders.")
@click.argument("images", type=click.Path(path_type=Path, readable=False), nargs=-1, required=True)
@click.option(
    "--out", type=_path, required=True, help="Folder for <stem>_mask.png, <stem>_overlay.png and segment.csv."
)
@pattern_option
def segment_command(images, out, patterns):
    """Lung masks with the bundled segmenter (files or folders): a mask and an overlay per image, and
    segment.csv; images without two plausible lungs get their reason; unreadable files an error (exit 1)."""
    from covidxr.runtime.inference import expand_inputs
    from covidxr.runtime.segment import segment_files

    rows = segment_files(expand_inputs(images, patterns), out)
    for row in rows:
        if row["error"]:
            click.echo(f"ERROR {row['error']}", err=True)
        elif row["reason"]:
            click.echo(f"{row['file']}: out of distribution: {row['reason']}", err=True)
    errors = sum(bool(row["error"]) for row in rows)
    flagged = sum(bool(row["reason"]) for row in rows)
    click.echo(f"{len(rows)} image(s) → {out}: {flagged} without two plausible lungs, {errors} unreadable")
    click.echo(DISCLAIMER)
    if errors:
        raise click.ClickException(f"{errors} of {len(rows)} file(s) could not be read")


@cli.command("monitor", short_help="Check predictions for drift against a site's images.")
@click.argument("predictions", type=_path, nargs=-1, required=True)
@click.option("--site", type=_path, required=True, help="site.json from `covidxr calibrate` for the same model.")
@click.option(
    "--window",
    type=click.IntRange(4),
    default=None,
    help="Consecutive images per window (default 500; not with --by-date).",
)
@click.option(
    "--by-date",
    "by_date",
    default=None,
    metavar="COLUMN",
    help="Window by the dates in this column of the files (ISO 8601, e.g. 2024-03-01), one window per --period.",
)
@click.option(
    "--period",
    type=click.Choice(["day", "week", "month"]),
    default=None,
    help="With --by-date: one window per day, ISO week or month (default week).",
)
@click.option(
    "--out",
    type=_path,
    default=Path("monitor"),
    show_default=True,
    help="Folder for monitor.json (figures per window, rules, verdict) and monitor.png.",
)
def monitor_command(predictions, site, window, by_date, period, out):
    """Drift: compare windows of `predict --out` files (CSV or JSON, in order, one model) with the site's
    calibration images (PSI and KS of p(COVID-19), OOD and no-answer rates, share called COVID-19, and the
    images' sizes, bit depths and modes where the files hold them). Windows of --window images, or by date.
    Exit 2 on an alarm, 1 on an error, 0 when every window is within the limits."""
    from covidxr.runtime.errors import CovidxrError
    from covidxr.runtime.monitor import describe_window, monitor_predictions, write_monitor

    if by_date is not None and window is not None:
        raise CovidxrError("give --window N or --by-date COLUMN, not both")
    if period is not None and by_date is None:
        raise CovidxrError("--period needs --by-date COLUMN (the column that holds each image's date)")
    report = monitor_predictions(predictions, site, window or 500, by_date, period or "week")
    if by_date is None:
        windows_are = f"windows of {report.window} images"
    else:
        windows_are = f"one window per {report.period} of the dates in column {by_date}"
    click.echo(f"monitoring {report.model} against {report.site} ({site}); {windows_are}")
    if not report.images_compared:
        click.echo(
            "image sizes and bit depths not compared: the predictions files or the site file do not hold them "
            "(write predictions and calibrate with this covidxr)"
        )
    for item in report.windows:
        click.echo(describe_window(item, report.calibration))
    if report.skipped:
        click.echo(report.skipped)
    if report.unreadable:
        click.echo(f"{report.unreadable} unreadable image(s) (error rows) left out")
    record, figure = write_monitor(report, out)
    click.echo(f"wrote {record} and {figure}")
    click.echo(DISCLAIMER)
    alarmed = [w for w in report.windows if w.alarms]
    if alarmed:
        first = alarmed[0]
        click.echo(
            f"ALARM: drift in {len(alarmed)} of {len(report.windows)} window(s) (first: window {first.index}, "
            f"{'; '.join(first.alarms)}): the images no longer look like the calibration images; check the "
            "scanner, protocol, population and pipeline, and recalibrate with `covidxr calibrate` before trusting "
            "the answers"
        )
        click.get_current_context().exit(2)
    click.echo(f"OK: all {len(report.windows)} window(s) within the calibration's limits")
