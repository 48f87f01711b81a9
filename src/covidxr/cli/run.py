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
    """One aligned line per image: file name, label, p(COVID-19), and a flag (no answer, the error, why the label
    goes against the larger bar, an image the model was trained on). A no-answer row shows no probability: a
    number beside "no answer" reads as one (``--json`` and ``--out`` keep it, for research)."""
    from covidxr.runtime.site import describe_set

    rows = [("file", "label", "p(COVID-19)", "flag")]
    for result in results:
        name = Path(result["file"]).name
        if "error" in result:
            rows.append((name, "ERROR", "", result["error"]))
        elif result["label"] is None:
            rows.append((name, "-", "", f"{result['no_answer_reason']}: no answer"))
        else:
            members = result.get("prediction_set")
            flags = [
                None if members is None else f"set {describe_set(members)}",
                result.get("decision_note"),
                "seen in training" if result.get("seen_in_training") else None,
            ]
            flag = "; ".join(filter(None, flags))
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

threshold_option = click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Your own COVID-19 operating point: COVID-19 when p(COVID-19) reaches it (recorded in every row; "
    "not with --site).",
)


def _seen_warning(flags: list) -> str | None:
    """One line when a batch holds images of the model's own training split (their answers test nothing)."""
    seen = sum(flag is True for flag in flags)
    if not seen:
        return None
    return (
        f"warning: {seen} of {len(flags)} image(s) are in this model's training split (seen_in_training): "
        "their answers say nothing about how it does on new images"
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


@cli.command("predict", short_help="Label chest X-rays: files, folders (CSV/JSON/Parquet out).")
# No readability check here: an unreadable file becomes its own error row and the others still run.
@click.argument("images", type=click.Path(path_type=Path, readable=False), nargs=-1, required=True)
@click.option("--model", "run", type=_path, default=None, help=FOREIGN_MODEL_HELP)
@spec_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option(
    "--out",
    type=_path,
    default=None,
    help="Write one row per image to this .csv, .json or .parquet, chunk by chunk (folders are searched "
    "recursively; a .parquet's rows go to FILE.parquet.partial.csv until the run is complete).",
)
@click.option("--resume", is_flag=True, help="Complete an existing --out file without redoing its rows.")
@click.option("--chunk-size", type=click.IntRange(1), default=256, show_default=True, help="Images per write.")
@click.option(
    "--dicom-out",
    type=_path,
    default=None,
    help="Also write, for each DICOM input, a Structured Report and a Grad-CAM Secondary Capture in its study "
    "into this folder (needs covidxr[pacs]).",
)
@click.option(
    "--ray",
    "ray_address",
    default=None,
    metavar="local|auto|ADDRESS",
    help="Predict on Ray Data (pip install 'covidxr[ray]'): local starts Ray here, auto joins the one running here, "
    "HOST:PORT a cluster; --threads is then per actor. Needs --out.",
)
@pattern_option
@site_option
@threshold_option
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
    dicom_out,
    ray_address,
    patterns,
    site,
    threshold,
    engine,
    threads,
    weights,
    weights_dir,
    cache_dir,
):
    """Predict the class of each image (files or folders); bad files are reported and skipped (exit 1 if any).

    --model MODEL.onnx predicts with a model covidxr did not train, described by its spec (MODEL.yaml beside it,
    or --spec): the same columns and one answer per image, without covidxr's out-of-distribution guard."""
    from covidxr.runtime.answers import SITE_OR_THRESHOLD, weakness, with_threshold
    from covidxr.runtime.calibration import describe_operating_point
    from covidxr.runtime.inference import expand_inputs, predict_files
    from covidxr.runtime.runners import make_engine
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.site import describe_site, with_site
    from covidxr.runtime.writer import journal_of, output_format, predict_to_file

    if site is not None and threshold is not None:  # before either is read
        raise click.ClickException(SITE_OR_THRESHOLD)
    images = expand_inputs(images, patterns)  # before the model loads: an empty folder is one line, at once
    out = None if out is None else output_format(out)  # a wrong --out too, before --dicom-out writes anything
    foreign = _foreign_model(run, spec, site, engine, threads)
    if ray_address is not None and (out is None or foreign is not None):
        raise click.ClickException("--ray writes rows to a file of a covidxr model: give --out, and no MODEL.onnx")
    if foreign is None:
        loaded = with_threshold(with_site(load_run(run or default_model_path(), weights, weights_dir), site), threshold)
        runner = engine if ray_address else make_engine(loaded, engine, cache_dir, threads)
        if dicom_out is not None:
            if ray_address is not None:
                raise click.ClickException("--dicom-out writes on this machine: run it without --ray")
            _write_dicom_out(loaded, runner, expand_inputs(images), dicom_out)
    elif threshold is not None:
        raise click.ClickException("--threshold is for covidxr runs; a foreign model's is its spec's output.threshold")
    else:
        if dicom_out is not None:
            raise click.ClickException("--dicom-out needs a covidxr run (its SC holds Grad-CAM); not a foreign model")
        loaded, runner = foreign, engine
    weak = None if foreign is not None else f"Held-out weakness: {weakness(loaded)}."
    if out is not None:
        try:
            if ray_address is not None:
                from covidxr.runtime.archive import predict_archive

                rows, new = predict_archive(
                    loaded, images, out, ray_address, resume, engine, cache_dir, threads, _progress(), chunk_size
                )
            else:
                rows, new = predict_to_file(
                    loaded, images, out, resume, cache_dir, progress=_progress(), chunk_size=chunk_size, engine=runner
                )
        except KeyboardInterrupt:  # Ctrl-C or SIGINT: one line, and 128 + SIGINT as a shell expects
            click.echo(f"Error: interrupted; the finished rows are in {journal_of(out)}: rerun with --resume", err=True)
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
            f"({len(rows) - new} were already done)"
        )
        seen = _seen_warning([row.get("seen_in_training") for row in rows if not row["error"]])
        click.echo("\n".join(filter(None, [seen, weak, DISCLAIMER])))
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
        seen = _seen_warning([r.get("seen_in_training") for r in results if "error" not in r])
        if seen:
            click.echo(seen)
        if weak:
            click.echo(weak)
        if foreign is not None:
            decision = f"label: {foreign.describe_decision()}; a foreign model, without out-of-distribution guard"
        else:
            if loaded.threshold is not None:
                rule = "your --threshold"
            elif loaded.site is None:
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


def _write_dicom_out(loaded, runner, paths: list[Path], folder: Path) -> None:
    """``predict --dicom-out``: the SR and SC of each DICOM input, with the engine ``predict`` uses; one line
    says what was written and how many inputs were not DICOM (unreadable ones get predict's error rows)."""
    from covidxr.runtime.api import Model
    from covidxr.runtime.dicom_out import write_dicom_results

    rows = write_dicom_results(Model.with_engine(loaded, runner), paths, folder)
    for row in rows:
        if "no_output" in row:
            click.echo(f"ERROR no SR or SC: {row['no_output']}", err=True)
    written = sum("sr" in row for row in rows)
    skipped = sum("skipped" in row for row in rows)
    unread = sum("error" in row or "no_output" in row for row in rows)
    click.echo(
        f"DICOM results: {written} SR + SC pair(s) → {folder}; {skipped} input(s) not DICOM, so no DICOM output; "
        f"{unread} DICOM file(s) got none (their errors say why)",
        err=True,
    )


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
@threshold_option
@model_options
def serve_command(
    run, spec, host, port, engine, threads, max_queue, monitor_window, site, threshold, weights, weights_dir, cache_dir
):
    """Serve the page and the JSON API (POST /api/predict, /api/explain; GET /api/model, /healthz, /docs) and
    the input monitor over the last answers (/monitor).

    --model MODEL.onnx serves a model covidxr did not train (its spec beside it, or --spec): the same answers,
    without out-of-distribution guard, and /api/explain answers without a heat map (Grad-CAM needs a run)."""
    from covidxr.runtime.answers import SITE_OR_THRESHOLD, with_threshold
    from covidxr.runtime.api import ForeignModel, Model
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.serve import serve
    from covidxr.runtime.site import describe_site, with_site

    if site is not None and threshold is not None:  # before either is read
        raise click.ClickException(SITE_OR_THRESHOLD)
    model = _foreign_model(run, spec, site, engine, threads)
    if model is None:
        loaded = with_threshold(with_site(load_run(run or default_model_path(), weights, weights_dir), site), threshold)
        model = Model(loaded, engine, cache_dir, threads)
    elif threshold is not None:
        raise click.ClickException("--threshold is for covidxr runs; a foreign model's is its spec's output.threshold")
    if threshold is not None:
        click.echo(f"covidxr: COVID-19 threshold {threshold:.3f}, chosen with --threshold", err=True)
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
    from covidxr.runtime.cam import EMPTY_MAP
    from covidxr.runtime.inference import expand_inputs

    images = expand_inputs(images, patterns)
    model = load_model(run, weights=weights, weights_dir=weights_dir)
    results = model.explain_files(images, out, method)
    for result in results:
        if "error" in result:
            click.echo(f"{result['file']}: ERROR {result['error']}")
        else:
            share = result["lung_share"]
            if result["map_empty"]:
                inside = EMPTY_MAP
            else:
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
@click.option("--resume", is_flag=True, help="Complete the segment.csv in --out without redoing its rows.")
@pattern_option
def segment_command(images, out, resume, patterns):
    """Lung masks with the bundled segmenter (files or folders): a mask and an overlay per image, and
    segment.csv; images without two plausible lungs get their reason; unreadable files an error (exit 1)."""
    from covidxr.runtime.inference import expand_inputs
    from covidxr.runtime.segment import segment_files

    rows = segment_files(expand_inputs(images, patterns), out, resume)
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
    """Drift: compare windows of `predict --out` files (CSV, JSON or Parquet, in order, one model) with the site's
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


@cli.command("dicom-node", short_help="Receive X-rays by DICOM and send back SR and SC.")
@click.option("--ae-title", default="COVIDXR", show_default=True, help="This node's AE title.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (the default: this machine only)."
)
@click.option("--port", type=click.IntRange(1, 65535), default=11112, show_default=True)
@click.option(
    "--send-to", required=True, metavar="AET@HOST:PORT", help="Where the SR and SC go by C-STORE (e.g. your PACS)."
)
@click.option(
    "--spool",
    type=_path,
    default=Path("covidxr-node"),
    show_default=True,
    help="Folder for received images not yet predicted (inbox/), results not yet stored (outbox/) and "
    "unreadable images (failed/); what it holds is taken up on the next start.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Images that may wait for the model, all associations together; one more is answered busy (A700).",
)
@click.option(
    "--retries",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    help="Tries after a refused or failed send, --backoff s, then twice as long each; then kept in outbox/.",
)
@click.option("--backoff", type=click.FloatRange(0), default=1.0, show_default=True, help="First wait, seconds.")
@click.option("--model", "run", type=_path, default=None, help="Run folder of a trained model (default: bundled).")
@site_option
@prediction_engine_options
@model_options
def dicom_node_command(
    ae_title,
    host,
    port,
    send_to,
    spool,
    max_queue,
    retries,
    backoff,
    run,
    site,
    engine,
    threads,
    weights,
    weights_dir,
    cache_dir,
):
    """A DICOM Storage SCP: predicts each CR, DX or secondary-capture chest image it receives and sends a
    Structured Report and a Grad-CAM Secondary Capture, in the image's study, to --send-to. Stops on SIGTERM
    without losing anything received."""
    import logging

    from covidxr.runtime.api import Model
    from covidxr.runtime.dicom_node import Destination, DicomNode
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.site import with_site

    destination = Destination.parse(send_to)
    model = Model(
        with_site(load_run(run or default_model_path(), weights, weights_dir), site), engine, cache_dir, threads
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines dump association details
    click.echo(f"covidxr: DICOM node ({DISCLAIMER})", err=True)
    DicomNode(
        model, destination, spool, ae_title, host, port, max_queue, retries=retries, backoff_s=backoff
    ).serve_forever()
