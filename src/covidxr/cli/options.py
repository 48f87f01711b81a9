"""The ``covidxr`` group and the options its commands share. Errors print as one line, exit code 1."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidxr import __version__
from covidxr.runtime.config import CONSTRAINTS
from covidxr.runtime.engines import RUNNERS, TRAIN_EXTRA
from covidxr.runtime.errors import CovidxrError

__all__ = ["cli"]

_path = click.Path(path_type=Path)
# What `reproduce` evaluates every trained model on, besides its own test split, when it exists.
_existing_dir = click.Path(exists=True, file_okay=False, path_type=Path)


def _config_type(name: str) -> click.ParamType:
    """The click type of the training option ``name``, built from ``covidxr.runtime.config.CONSTRAINTS`` (the values
    ``TrainConfig`` accepts), so the command line and the config never disagree."""
    allowed = CONSTRAINTS[name]
    if isinstance(allowed, tuple):
        return click.Choice(allowed)
    kind = click.IntRange if allowed.integer else click.FloatRange
    return kind(allowed.low, allowed.high, min_open=allowed.low_open, max_open=allowed.high_open)


def _config_option(flag: str, field: str | None = None, **kwargs):
    """``--some-option`` of the TrainConfig field ``some_option`` (or ``field``): its type from ``_config_type``,
    default None (the config file's value)."""
    field = field or flag[2:].replace("-", "_")
    return click.option(flag, field, type=_config_type(field), default=None, **kwargs)


# What the training install adds (pip install "covidxr[train]"); the runtime install has none of them.
TRAIN_MODULES = {
    "torch", "torchvision", "timm", "sklearn", "scipy", "skimage", "matplotlib", "pandas", "pytorch_grad_cam",
    "imagehash", "onnx", "efficientnet_lite_pytorch", "cv2", "h5py",
}  # fmt: skip


class FriendlyGroup(click.Group):
    """Turns CovidxrError into click's one-line ``Error: …`` and a non-zero exit; a command that needs the
    training install where only the runtime is installed says what to install, in one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CovidxrError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in TRAIN_MODULES:
                raise
            raise click.ClickException(
                f"this command needs the training install ({exc.name} is missing): {TRAIN_EXTRA}"
            ) from None


weights_file_option = click.option(
    "--weights", type=_path, default=None, help="Backbone weights file (.safetensors or .pth) in the registry's layout."
)
weights_dir_option = click.option(
    "--weights-dir",
    type=_path,
    default=None,
    envvar="COVIDXR_WEIGHTS_DIR",
    help="Folder of <model>.safetensors / <model>.pth files [env: COVIDXR_WEIGHTS_DIR].",
)
cache_option = click.option(
    "--cache-dir",
    type=_path,
    default=None,
    envvar="COVIDXR_CACHE_DIR",
    help="Feature cache folder [env: COVIDXR_CACHE_DIR; default ~/.cache/covidxr].",
)


# What computes frozen features (train, reproduce: saved in the run's config; default: the config's).
feature_engine_option = _config_option(
    "--engine",
    "feature_engine",
    help="What computes frozen features: auto (onnxruntime on a CPU where installed, else torch).",
)


def prediction_engine_options(func):
    """``--engine`` and ``--threads`` of the commands that predict (predict, serve)."""
    engine = click.option(
        "--engine",
        type=click.Choice(RUNNERS),
        default="auto",
        show_default=True,
        help="onnx: the model exported once to ONNX and run by onnxruntime; auto: onnx on a CPU where installed; "
        "int8: the quantised graph `covidxr quantize` accepted.",
    )
    threads = click.option(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (default: half the physical cores; the others decode the images).",
    )
    return engine(threads(func))


pattern_option = click.option(
    "--pattern",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Inside folders, read only files whose name matches (e.g. '*.dcm', 'IM*'; repeatable). "
    "Default: every file, each judged by its content; a file that is not an image gets a row saying so.",
)


def weights_options(func):
    return weights_dir_option(weights_file_option(func))


def model_options(func):
    return cache_option(weights_options(func))


def _progress() -> bool:
    return sys.stderr.isatty()


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="covidxr")
def cli() -> None:
    """covidxr: COVID-19 / NORMAL / PNEUMONIA chest X-ray classification (research use only)."""


# ---------------------------------------------------------------------------------------------
