"""The lab's commands (training, evaluation, audits, exports, reports): each imports ``covidxr.lab`` only
when it runs, so ``covidxr --help`` and the runtime's commands never load it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from covidxr import DISCLAIMER
from covidxr.cli.options import (
    FriendlyGroup,
    _config_option,
    _existing_dir,
    _path,
    _progress,
    cache_option,
    cli,
    feature_engine_option,
    model_options,
    prediction_engine_options,
    weights_dir_option,
    weights_options,
)
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError

DEFAULT_EXTERNAL = Path("../shared/data/adult-controls")


@cli.group(cls=FriendlyGroup)
def data() -> None:
    """Build datasets from raw public sources and check them."""


@data.command("build", short_help="Build a dataset folder from raw public sources.")
@click.option(
    "--ieee8023", type=_existing_dir, help="ieee8023 covid-chestxray-dataset folder (metadata.csv + images/)."
)
@click.option("--kermany", type=_existing_dir, help="Kermany chest_xray folder ({train,test,val}/{NORMAL,PNEUMONIA}).")
@click.option("--out", type=_path, required=True, help="New dataset folder to write (metadata.csv + images/).")
def data_build(ieee8023: Path | None, kermany: Path | None, out: Path) -> None:
    """Turn raw sources into covidxr's dataset format, dropping identical images."""
    from covidxr.lab.sources import build_dataset, read_ieee8023, read_kermany

    if not ieee8023 and not kermany:
        raise CovidxrError("give at least one source: --ieee8023 DIR and/or --kermany DIR")
    parts = ([read_ieee8023(ieee8023)] if ieee8023 else []) + ([read_kermany(kermany)] if kermany else [])
    import pandas as pd

    frame, skipped = build_dataset(pd.concat(parts, ignore_index=True), out)
    for message in skipped:
        click.echo(message, err=True)
    counts = ", ".join(f"{label} {n}" for label, n in frame["label"].value_counts().sort_index().items())
    click.echo(f"wrote {out / 'metadata.csv'}: {len(frame)} images ({counts}), {len(skipped)} skipped")


@data.command("check", short_help="Check a dataset folder's metadata and images.")
@click.argument("directory", type=_path)
def data_check(directory: Path) -> None:
    """List unreadable, missing, duplicate and mislabelled rows; exit 1 when any exists."""
    from covidxr.lab.data import check_dataset

    problems = check_dataset(directory)
    for problem in problems:
        click.echo(str(problem))
    if problems:
        raise click.ClickException(f"{directory}: {len(problems)} problem(s)")
    click.echo(f"{directory}: no problems found")


# ---------------------------------------------------------------------------------------------
@cli.command("models", short_help="List the backbones and where their weights are.")
@weights_dir_option
def models_command(weights_dir: Path | None) -> None:
    """List the registered backbones and where their pretrained weights would come from (nothing is
    loaded or downloaded)."""
    from covidxr.lab.models import REGISTRY

    for spec in REGISTRY.values():
        click.echo(
            f"{spec.name:20s} {spec.native_size}px  {spec.reference}  [weights: {_weights_status(spec, weights_dir)}]"
        )


def _weights_status(spec, weights_dir: Path | None) -> str:
    """The first place of the lookup order (``covidxr.lab.models.resolve_weights``) that holds a file for ``spec``."""
    import importlib
    import importlib.util
    import os

    folder = weights_dir or (Path(os.environ["COVIDXR_WEIGHTS_DIR"]) if os.environ.get("COVIDXR_WEIGHTS_DIR") else None)
    for suffix in (".safetensors", ".pth", ".pt"):
        if folder is not None and (folder / f"{spec.name}{suffix}").is_file():
            return f"weights-dir {folder / f'{spec.name}{suffix}'}"
    if spec.pip_package is not None and importlib.util.find_spec(spec.pip_package[0]) is not None:
        module = importlib.import_module(spec.pip_package[0])
        return f"package {getattr(module, spec.pip_package[1]).get_model_file_path()}"
    if spec.download is not None and os.environ.get("COVIDXR_OFFLINE", "") not in {"1", "true", "yes"}:
        return "not here; downloaded from upstream on first use where the network is reachable"
    return "not available here (see docs/user-guide.md: Models and weights)"


@cli.group(cls=FriendlyGroup, short_help="Import backbone weights from other tools (Keras).")
def weights() -> None:
    """Bring backbone weights from other tools into covidxr's registry layout."""


@weights.command("import", short_help="Keras .h5 or .weights.h5 into the registry layout.")
@click.argument("source", type=_path)
@click.option("--model", required=True, help="The architecture the file holds: vgg16, resnet50 or xception.")
@click.option("--out", type=_path, required=True, help="Folder to write <model>.safetensors and <model>.json into.")
def weights_import(source: Path, model: str, out: Path) -> None:
    """Import keras.applications weights (legacy .h5, top or notop, or Keras 3 .weights.h5); use the folder
    with --weights-dir, and the model is built and its images prepared as Keras did."""
    from covidxr.lab.keras_weights import KERAS_MODELS, import_keras_weights

    result = import_keras_weights(source, model, out)
    if result.top:
        click.echo(f"{source}: the top variant; its ImageNet classifier is left out (covidxr uses the backbone only)")
    click.echo(
        f"wrote {result.weights} and {result.sidecar}: keras.applications.{KERAS_MODELS[model]} "
        f"({result.file_format}, {result.layers} layers) in {result.seconds:.1f} s"
    )


def _load_config(config_file: Path | None, **overrides) -> TrainConfig:
    config = TrainConfig.load(config_file) if config_file else TrainConfig()
    return TrainConfig.from_dict(config.to_dict() | {k: v for k, v in overrides.items() if v is not None})


def design_options(func):
    """Options beyond the paper's protocol; each defaults to the config file's value (the paper's)."""
    options = [
        _config_option("--batch-size", help="Global batch (split over torchrun processes)."),
        _config_option("--learning-rate"),
        _config_option("--intensity"),
        _config_option("--effective-resolution", help="Downsample every image to this first."),
        click.option("--crop-thorax/--no-crop-thorax", default=None),
        click.option("--mask-text/--no-mask-text", default=None, help="Mask burnt-in text, markers and borders."),
        _config_option("--lungs", help="Lung-only input (the bundled segmenter)."),
        _config_option("--decision", help="staged: abnormal, then COVID-19."),
        click.option(
            "--group-balanced-sampling/--no-group-balanced-sampling", default=None, help="Every source x class equally."
        ),
        click.option("--augment/--no-augment", default=None, help="Randomise the acquisition look (training only)."),
        _config_option("--augment-views", help="Cached augmented views per image (0: fresh)."),
        _config_option("--adversarial-weight", help="Source-adversarial head weight (0: off)."),
        _config_option("--unfreeze-blocks", help="Fine-tune the last N backbone blocks."),
        click.option(
            "--cache-front/--no-cache-front", default=None, help="Fine-tune on the frozen front's cached maps."
        ),
        _config_option("--backbone-lr-scale"),
        click.option("--balanced-sampling/--no-balanced-sampling", default=None),
        _config_option("--label-smoothing"),
        _config_option("--early-stopping-patience", help="Epochs without improvement (0: off)."),
        _config_option("--schedule"),
        _config_option("--precision"),
        feature_engine_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command("train", short_help="Train a model on a dataset folder.")
@click.option(
    "--data",
    "data_dirs",
    type=_path,
    required=True,
    multiple=True,
    help="Dataset folder; repeat to merge several sources (split by patient within each).",
)
@click.option("--model", type=str, default=None, help="Registered backbone (see `covidxr models`).")
@click.option("--out", type=_path, required=True, help="New run folder (or an interrupted one, to resume it).")
@click.option("--config", "config_file", type=_path, default=None, help="YAML training config.")
@_config_option("--epochs")
@click.option("--seed", type=int, default=None)
@_config_option("--image-size")
@click.option(
    "--allow-near-duplicate-leakage",
    is_flag=True,
    default=None,
    help="Split by patient only and accept near-duplicate images in two splits (not recommended).",
)
@design_options
@model_options
def train_command(data_dirs, out, config_file, allow_near_duplicate_leakage, weights, weights_dir, cache_dir, **values):
    """Train a model (by default the paper's head on a frozen backbone); writes a run folder.

    Under torchrun (e.g. `torchrun --nproc_per_node 2 -m covidxr train ...`) the processes share the work.
    """
    from covidxr.lab.train import train

    config = _load_config(config_file, **values)
    if allow_near_duplicate_leakage:
        config = replace(config, group_near_duplicates=False, allow_near_duplicate_leakage=True)
    run = train(data_dirs, out, config, weights, weights_dir, cache_dir, progress=_progress())
    if (run / "run.json").exists():  # only the main process writes it
        info = json.loads((run / "run.json").read_text())
        click.echo(f"trained {config.model} → {run} (best epoch {info['best_epoch']}); next: covidxr evaluate {run}")


@cli.command("evaluate", short_help="Score a run on a dataset: metrics, figures, report.")
@click.argument("run", type=_path)
@click.option("--data", "data_dir", type=_path, default=None, help="Evaluate on every image of another dataset.")
@click.option(
    "--spec", type=_path, default=None, help="The spec of a foreign RUN=MODEL.onnx (default: the .yaml beside it)."
)
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True)
@click.option(
    "--out", type=_path, default=None, help="Output folder (default: the run folder; with --data RUN/external/NAME)."
)
@click.option("--no-explain", is_flag=True, help="Skip the Grad-CAM figure and the explanation checks.")
@model_options
def evaluate_command(run, data_dir, spec, split, out, no_explain, weights, weights_dir, cache_dir):
    """Write metrics.json, predictions.csv, the four figures and the reports.

    RUN may also be a foreign MODEL.onnx with its spec (MODEL.yaml beside it, or --spec), evaluated on every image
    of --data DIR into --out (default MODEL-evaluation/DIR-NAME/ beside the graph): metrics.json, predictions.csv,
    confusion_matrix.png and the report; labels the model lacks are mapped as metrics.json's label_map says."""
    from covidxr.runtime.foreign import is_foreign_model

    if is_foreign_model(run, spec):
        from covidxr.lab.evaluate_foreign import default_out, evaluate_foreign, summary_line

        if data_dir is None:
            raise click.ClickException(f"{run}: a foreign model has no test split of its own: give --data DIR")
        if click.get_current_context().get_parameter_source("split").name != "DEFAULT":
            raise click.ClickException("--split is for a covidxr run folder; a foreign model is evaluated on --data")
        out = out or default_out(run, data_dir)
        click.echo(summary_line(evaluate_foreign(run, data_dir, out, spec), out))
        return
    from covidxr.lab.evaluate import evaluate_run, external_folder

    out = out or (external_folder(run, data_dir) if data_dir else None)

    metrics = evaluate_run(
        run, data_dir, split, out, weights, weights_dir, cache_dir, progress=_progress(), explain=not no_explain
    )
    low, high = metrics["accuracy_ci95"]
    click.echo(
        f"{metrics['model']} on {metrics['data']} ({metrics['split']}): accuracy {metrics['accuracy']:.1%} "
        f"(95% CI {low:.1%}-{high:.1%}), n={metrics['n']}; written to {out or run}"
    )
    left_out = metrics.get("seen_in_training_left_out")
    if left_out:
        click.echo(f"left out {left_out} image(s) of the model's own training split (seen_in_training)")
    elif data_dir and left_out is None:
        click.echo("training images could not be left out: this run's splits.csv has no sha256 column")


@cli.command("calibrate", short_help="Set the COVID-19 operating point on a site's images.")
@click.argument("data", type=_path)
@click.option(
    "--model", "run", type=_path, default=None, help="Run folder of a trained model (default: the bundled model)."
)
@click.option(
    "--specificity",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Target share of local non-COVID images not called COVID-19 (e.g. 0.95).",
)
@click.option(
    "--sensitivity",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Target share of local COVID-19 images called COVID-19.",
)
@click.option(
    "--coverage",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Conformal prediction sets: per class, the share of local images whose set holds their class (e.g. 0.9).",
)
@click.option("--out", type=_path, required=True, help="The site file to write (e.g. site.json).")
@click.option("--site-name", default=None, help="The site's name in the file and the answers (default: DATA's name).")
@prediction_engine_options
@model_options
def calibrate_command(
    data, run, specificity, sensitivity, coverage, out, site_name, engine, threads, weights, weights_dir, cache_dir
):
    """Set the COVID-19 operating point on a site's own labelled images (DATA: metadata.csv with filename,label)
    and write it to --out for `predict --site` / `serve --site`; prints the local rates with exact 95% intervals."""
    from covidxr.lab.site import calibrate_site, describe_unreadable
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.site import describe_site

    if specificity is not None and sensitivity is not None:
        raise CovidxrError("give one target: --specificity S or --sensitivity S (and/or --coverage C)")
    if specificity is None and sensitivity is None and coverage is None:
        raise CovidxrError("give a target: --specificity S or --sensitivity S, and/or --coverage C")
    metric, target = ("specificity", specificity) if specificity is not None else ("sensitivity", sensitivity)
    if target is None:
        metric = None
    if out.suffix != ".json":
        raise CovidxrError(f"{out}: --out must end in .json")
    loaded = load_run(run or default_model_path(), weights, weights_dir)
    site = calibrate_site(
        loaded, data, metric, target, site_name, engine, cache_dir, threads, progress=_progress(), coverage=coverage
    )
    site.save(out)
    counts = ", ".join(f"{label} {n}" for label, n in site.counts.items())
    click.echo(f"{describe_site(site)}")
    chosen = f"for {metric} {target:.0%}" if metric is not None else "kept"
    click.echo(
        f"COVID-19 threshold {site.covid_threshold:.4f} {chosen} "
        f"(the model's own: {site.run_threshold:.4f}); images given an answer: {counts}; "
        f"{site.inputs['unanswered']} of {site.inputs['images']} given none (not counted)"
    )
    if site.unreadable:
        click.echo(
            f"{len(site.unreadable)} unreadable image(s) left out (all listed in {out}): "
            f"{describe_unreadable(site.unreadable)}"
        )
    if site.conformal is not None:
        per_class = ", ".join(
            f"{label} {entry['threshold']:.4f} (n={entry['n']})" for label, entry in site.conformal["classes"].items()
        )
        click.echo(
            f"prediction sets for {site.conformal['coverage']:.0%} coverage per class (split conformal, LAC score "
            f"1 - p): a class is in an image's set where 1 - p <= {per_class}; an image whose set is not one "
            "class is answered indeterminate"
        )
    for name, rate in site.achieved.items():
        click.echo(f"local {name}: {rate} (exact 95% interval, n={rate.n})")
    if site.note:
        click.echo(site.note)
    click.echo(f"wrote {out}: use it with `covidxr predict --site {out}` or `covidxr serve --site {out}`")
    click.echo(DISCLAIMER)


@cli.command("validate", short_help="Write the local validation report a hospital files.")
@click.argument("data", type=_path)
@click.option(
    "--model", "run", type=_path, default=None, help="Run folder of a trained model (default: the bundled model)."
)
@click.option(
    "--site", type=_path, default=None, help="site.json from `covidxr calibrate`: validate at its COVID-19 threshold."
)
@click.option("--out", type=_path, required=True, help="Folder for validation.md/.html/.json and predictions.csv.")
@click.option(
    "--precision",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.02,
    show_default=True,
    help="Half-width of the 95% intervals asked for sensitivity and specificity.",
)
@click.option(
    "--min-specificity",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.9,
    show_default=True,
    help="The lowest specificity accepted.",
)
@click.option(
    "--min-sensitivity",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.8,
    show_default=True,
    help="The lowest sensitivity accepted.",
)
@prediction_engine_options
@model_options
def validate_command(
    data,
    run,
    site,
    out,
    precision,
    min_specificity,
    min_sensitivity,
    engine,
    threads,
    weights,
    weights_dir,
    cache_dir,
):
    """The local validation report a hospital files before use: predict DATA's labelled images (metadata.csv with
    filename,label; sex, age_group, view, source used where present) as `predict` does, measure them with
    intervals and give a verdict (NOT READY, UNDECIDED or READY for a trial on this population)."""
    from covidxr.lab.validate import validate_site
    from covidxr.runtime.runs import default_model_path, load_run
    from covidxr.runtime.site import with_site

    loaded = with_site(load_run(run or default_model_path(), weights, weights_dir), site)
    record = validate_site(
        loaded, data, out, precision, min_specificity, min_sensitivity, engine, cache_dir, threads, _progress()
    )
    click.echo(record.verdict_line)
    counts = record.counts
    click.echo(
        f"{counts['images']} images: {counts['answered']} given an answer, {counts['no_answer']} given none, "
        f"{counts['unreadable']} unreadable; COVID-19 threshold {record.operating_point['covid_threshold']:.4f} "
        f"({record.operating_point['source']})"
    )
    click.echo(f"wrote {out / 'validation.md'}, validation.html, validation.json and predictions.csv")
    click.echo(DISCLAIMER)


@cli.command("export", short_help="Export a run as one ONNX graph.")
@click.argument("run", type=_path)
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=_path, default=None, help="Output .onnx file (default: RUN/model.onnx).")
@weights_options
def export_command(run, fmt, out, weights, weights_dir):
    """Export a run as one graph (preprocessed image → features, logits, Grad-CAM activations) plus a JSON
    sidecar; in the run folder (the default) it lets prediction run without torch."""
    from covidxr.lab.export import export_run_graph
    from covidxr.runtime.runs import load_run

    target = export_run_graph(load_run(run, weights, weights_dir), out)
    click.echo(f"wrote {target} and {target.with_suffix('.json')} (labels, preprocessing, temperature, threshold)")


@cli.command("quantize", short_help="Make and check an int8 copy of a run's graph.")
@click.argument("run", type=_path, required=False)
@click.option("--method", type=click.Choice(["static", "dynamic"]), default="static", show_default=True)
@click.option(
    "--max-drop",
    type=float,
    default=0.02,
    show_default=True,
    help="Refuse int8 if validation accuracy (of the labels predict gives) or COVID-19 AUC drops by more than this.",
)
@click.option("--calibration-images", type=click.IntRange(1), default=128, show_default=True)
@click.option("--data", "data_root", type=_path, default=None, help="Folder the run's image names are relative to.")
@model_options
def quantize_command(run, method, max_drop, calibration_images, data_root, weights, weights_dir, cache_dir):
    """Make an int8 copy of a run's graph (default: the bundled model) for `predict --engine int8`,
    kept only if it stays accurate on the validation split."""
    from covidxr.lab.quantize import quantize_run
    from covidxr.runtime.runs import default_model_path, load_run

    loaded = load_run(run or default_model_path(), weights, weights_dir)
    report = quantize_run(loaded, method, max_drop, calibration_images, cache_dir, data_root)
    fp32, int8 = report["fp32"], report["int8"]
    auc = f"; COVID-19 AUC {fp32['covid_auc']:.3f} → {int8['covid_auc']:.3f}" if fp32["covid_auc"] is not None else ""
    click.echo(
        f"int8 ({method}) accepted: validation accuracy {fp32['accuracy']:.1%} → {int8['accuracy']:.1%} (the labels "
        f"given; no answer is not right), answered {fp32['answered']:.1%} → {int8['answered']:.1%}{auc}; "
        f"{report['labels_changed']} of {report['validation_images']} labels changed; "
        f"{fp32['images_per_second']} → {int8['images_per_second']} img/s ({report['speed_up']}x) "
        f"on this CPU (int8: {report['cpu_int8_instructions']}); use it with: covidxr predict --engine int8"
    )


@cli.command("bundle", short_help="Make a checked run the bundled model.")
@click.argument("run", type=_path)
@click.option("--dest", type=_path, default=None, help="Destination folder (default: the package's bundled/).")
def bundle_command(run, dest):
    """Make an evaluated, audited and held-out run the packaged default model (for maintainers), with its
    exported graph, so the package predicts without torch."""
    from covidxr.lab.export import export_run_graph
    from covidxr.runtime.card import bundle_run
    from covidxr.runtime.runs import BUNDLED, load_run

    bundled = bundle_run(run, dest or BUNDLED)
    graph = export_run_graph(load_run(bundled))
    click.echo(f"bundled {run} → {bundled} (graph {graph.name}, {graph.stat().st_size / 1e6:.1f} MB)")


@cli.command("audit", short_help="Check a run for shortcuts (lungs hidden, source).")
@click.argument("model", type=_path)
@click.option(
    "--data",
    "data_dirs",
    type=_path,
    multiple=True,
    help="Labelled dataset folder to audit on; repeat for several sources (the black-box audit).",
)
@click.option("--spec", type=_path, default=None, help="The ONNX graph's MODEL.yaml (default: beside the graph).")
@click.option(
    "--out",
    type=_path,
    default=None,
    help="Output folder (default: the run folder; black-box: ./audit-<model name>/).",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Black-box: images per source [default: 300].")
@click.option("--seed", type=int, default=None, help="Black-box: seed of the sample and the probes [default: 0].")
@click.option(
    "--blackbox",
    is_flag=True,
    help="Black-box audit of a run folder with one --data (ONNX graphs and several --data folders always get it).",
)
@model_options
def audit_command(model, data_dirs, spec, out, limit, seed, blackbox, weights, weights_dir, cache_dir):
    """Shortcut checks. MODEL.onnx (with MODEL.yaml) or several --data: the black-box audit (per source, lungs
    hidden, lungs only, periphery masks, acquisition, occlusion, calibration) into audit.json, audit.md and
    audit.html. A run folder alone (or with one --data): the run's audit (lungs hidden, source probe,
    resolution/format) into audit.json and the run's report."""
    is_run = model.is_dir()
    if not is_run or spec is not None or len(data_dirs) > 1 or blackbox:
        _blackbox_audit(model, data_dirs, spec, out, limit, seed)
        return
    if limit is not None or seed is not None:
        raise CovidxrError("--limit and --seed belong to the black-box audit: add --blackbox (and --data DIR)")
    from covidxr.lab.audit import run_audit
    from covidxr.lab.report import write_run_report
    from covidxr.runtime.runs import load_run

    data_dir = data_dirs[0] if data_dirs else None
    folder = out or model
    result = run_audit(load_run(model, weights, weights_dir), data_dir, folder, cache_dir, progress=_progress())
    for name, check in result["checks"].items():
        click.echo(f"{name}: {check['verdict']} - {check['summary']}")
    click.echo(f"overall: {result['verdict']}; written to {Path(folder) / 'audit.json'}")
    if (Path(folder) / "metrics.json").exists():
        write_run_report(Path(folder))
        click.echo(f"report updated: {Path(folder) / 'report.html'}")


def _blackbox_audit(
    model: Path, data_dirs: tuple[Path, ...], spec: Path | None, out: Path | None, limit: int | None, seed: int | None
) -> None:
    """The black-box audit of any model (``covidxr.lab.blackbox``); prints each check and where it wrote."""
    from covidxr.lab.blackbox import DEFAULT_LIMIT, audit_classifier, load_samples
    from covidxr.runtime.classifier import load_classifier

    if not data_dirs:
        raise CovidxrError(f"{model}: the black-box audit needs labelled images: pass --data DIR (repeatable)")
    classifier = load_classifier(model, spec)
    limit = DEFAULT_LIMIT if limit is None else limit
    seed = 0 if seed is None else seed
    samples, described = load_samples(data_dirs, limit, seed, progress=_progress())
    folder = out or Path(f"audit-{Path(classifier.name).stem}")
    result = audit_classifier(classifier, samples, folder, seed, limit, progress=_progress(), data=described)
    click.echo(result["verdict_line"])
    for name, check in result["checks"].items():
        click.echo(f"{name}: {check['verdict']} - {check['summary']}")
    click.echo(f"wrote {folder / 'audit.json'}, {folder / 'audit.md'} and {folder / 'audit.html'}")
    click.echo(DISCLAIMER)


@cli.command("reproduce", short_help="Run the paper's protocol for every backbone.")
@click.option(
    "--data",
    "data_dirs",
    type=_path,
    required=True,
    multiple=True,
    help="Dataset folder (e.g. ../shared/data/cxr3); with --design deconfounded repeat it for every source.",
)
@click.option("--out", type=_path, required=True, help="Output folder; finished models in it are reused.")
@click.option(
    "--design",
    type=click.Choice(["paper", "deconfounded"]),
    default="paper",
    show_default=True,
    help="paper: the preprint's protocol per backbone. deconfounded: the paper's design (first --data) beside "
    "training on every --data folder with each shortcut-resistant variant, with audits and leave-one-source-out.",
)
@click.option(
    "--models", default=None, help="Comma-separated backbones (default: the paper's three + EfficientNet-Lite0/1/2)."
)
@click.option(
    "--variants",
    default=None,
    help="Deconfounded design: comma-separated variants (default: all; see docs/validity.md).",
)
@click.option("--config", "config_file", type=_path, default=None, help="YAML training config.")
@_config_option("--epochs")
@click.option("--seed", type=int, default=None)
@click.option(
    "--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2,3,4: split and training repeated per seed."
)
@click.option(
    "--external",
    "external_dirs",
    type=_path,
    multiple=True,
    help=f"Dataset the models never saw, evaluated into <run>/external/ (repeatable; default: {DEFAULT_EXTERNAL} "
    "when it exists).",
)
@click.option("--no-external", is_flag=True, help="Evaluate on no other dataset.")
@feature_engine_option
@weights_dir_option
@cache_option
def reproduce_command(
    data_dirs,
    out,
    design,
    models,
    variants,
    config_file,
    epochs,
    seed,
    seeds,
    external_dirs,
    no_external,
    feature_engine,
    weights_dir,
    cache_dir,
):
    """Run the paper's protocol for every backbone with weights; write the report beside the paper's numbers."""
    from covidxr.lab.reproduce import DEFAULT_MODELS, DESIGN_VARIANTS, reproduce, reproduce_designs

    if design == "deconfounded":
        config = _load_config(config_file, epochs=epochs, seed=seed, feature_engine=feature_engine)
        model = models or "efficientnet_lite0"
        if "," in model:
            raise CovidxrError("--design deconfounded compares designs on one backbone; pass a single --models name")
        chosen = tuple(v.strip() for v in variants.split(",")) if variants else tuple(DESIGN_VARIANTS)
        reproduce_designs(data_dirs, out, model, config, chosen, weights_dir, cache_dir, _progress())
        click.echo(f"report: {out / 'report.html'} and {out / 'report.md'}\n{DISCLAIMER}")
        return
    if len(data_dirs) > 1:
        raise CovidxrError("--design paper uses one dataset; pass several --data folders with --design deconfounded")
    data_dir = data_dirs[0]
    config = _load_config(config_file, epochs=epochs, seed=seed, feature_engine=feature_engine)
    names = tuple(m.strip() for m in models.split(",")) if models else DEFAULT_MODELS
    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds else None
    except ValueError:
        raise CovidxrError(f"--seeds must be comma-separated integers, not {seeds!r}") from None
    if no_external:
        external_dirs = ()
    elif not external_dirs and DEFAULT_EXTERNAL.is_dir() and DEFAULT_EXTERNAL.resolve() != data_dir.resolve():
        external_dirs = (DEFAULT_EXTERNAL,)
    rows = reproduce(
        data_dir,
        out,
        names,
        config,
        weights_dir,
        cache_dir,
        progress=_progress(),
        seeds=seed_list,
        external=external_dirs,
    )
    for row in rows:
        if row["status"] != "trained":
            click.echo(f"{row['model']}: skipped ({row['reason']})")
            continue
        paper = f"; paper {row['paper_accuracy']:.1%}" if "paper_accuracy" in row else ""
        click.echo(
            f"{row['model']}: test accuracy {row['accuracy']:.1%} (95% CI {row['accuracy_ci95_low']:.1%}-"
            f"{row['accuracy_ci95_high']:.1%}), {row['correct']}/{row['n_test']}{paper}"
        )
        if row.get("accuracy_sd") is not None:
            click.echo(
                f"  over seeds {row['seeds']}: accuracy {row['accuracy_mean']:.1%} ± {row['accuracy_sd']:.1%} "
                f"(range {row['accuracy_min']:.1%}-{row['accuracy_max']:.1%})"
            )
    click.echo(f"report: {out / 'report.html'} and {out / 'report.md'}\n{DISCLAIMER}")
    if not any(row["status"] == "trained" for row in rows):
        raise click.ClickException("no model could be trained: none has weights here")


@cli.command("train-segmenter", short_help="Train the lung segmenter on hand-drawn masks.")
@click.option(
    "--masks", type=_existing_dir, required=True, help="Mask folder (metadata.csv: mask, image, patient_id, origin)."
)
@click.option("--out", type=_path, required=True, help="Run folder (rerun the same command to resume).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs [default: 18, the bundled graph's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the patient split and of training.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="torch threads.")
@click.option("--bundle", "bundle_it", is_flag=True, help="Copy the finished graph into the package (bundled/).")
def train_segmenter_command(masks, out, epochs, seed, threads, bundle_it):
    """Train the lung segmenter on hand-drawn masks, report held-out Dice per group, export ONNX."""

    from covidxr.lab.lungs_train import SegmenterConfig, bundle, train_segmenter

    config = SegmenterConfig(seed=seed, threads=threads)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    metrics = train_segmenter(masks, out, config)
    for group in ("children", "adults", "all"):
        m = metrics[group]
        click.echo(f"held-out {group}: {m['images']} images, Dice mean {m['dice_mean']:.4f} (min {m['dice_min']:.4f})")
    if bundle_it:
        click.echo(f"bundled {out} → {bundle(out)}")
