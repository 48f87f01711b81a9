"""The training configuration: the paper's protocol as defaults, loadable from and saved as YAML.

``CONSTRAINTS`` declares, once, the values each option may take: a tuple of choices or a numeric ``Range``.
``TrainConfig`` validates against it and the command line (``covidxr.cli``) builds its ``click.Choice`` /
``click.IntRange`` / ``click.FloatRange`` from it, so the two cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from covidxr.runtime.engines import ENGINES  # what computes frozen features
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.preprocess import INTENSITY_METHODS, LUNG_MODES, ImagePipeline

SCHEDULES = ("none", "cosine", "plateau")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 autocast where the CPU/GPU supports it
DECISIONS = ("flat", "staged")  # covidxr.lab.models.make_head
OPTIMIZERS = ("adam", "sgd")
__all__ = [
    "CONSTRAINTS",
    "DECISIONS",
    "ENGINES",
    "LUNG_MODES",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "Range",
    "TrainConfig",
    "check_option",
]


@dataclass(frozen=True)
class Range:
    """The numbers an option may take: ``low`` and ``high`` (None: unbounded), each included unless open;
    ``integer`` for whole numbers."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """In words, e.g. ``at least 1``, ``0 or more``, ``greater than 0``, ``in [0, 1)``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            if self.low_open:
                return f"greater than {self.low:g}"
            return f"{self.low:g} or more" if self.low == 0 else f"at least {self.low:g}"
        if self.high is not None:
            return f"less than {self.high:g}" if self.high_open else f"at most {self.high:g}"
        return "a number"


_AT_LEAST_1 = Range(1, integer=True)
_COUNT = Range(0, integer=True)  # 0 or more
_FRACTION = Range(0, 1, high_open=True)  # [0, 1)

# option -> its choices (a tuple) or its numeric Range; the single source for TrainConfig and the CLI.
CONSTRAINTS: dict[str, tuple[str, ...] | Range] = {
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "precision": PRECISIONS,
    "feature_engine": ENGINES,
    "decision": DECISIONS,
    "intensity": INTENSITY_METHODS,
    "lungs": LUNG_MODES,
    "image_size": _AT_LEAST_1,
    "epochs": _AT_LEAST_1,
    "batch_size": _AT_LEAST_1,
    "extract_batch_size": _AT_LEAST_1,
    "augment_views": _COUNT,
    "unfreeze_blocks": _COUNT,
    "early_stopping_patience": _COUNT,
    "num_workers": _COUNT,
    "hidden_units": _COUNT,
    "effective_resolution": _COUNT,  # and 0 (off) or at least MIN_EFFECTIVE_RESOLUTION: ImagePipeline
    "learning_rate": Range(0, low_open=True),
    "backbone_lr_scale": Range(0, low_open=True),
    "adversarial_weight": Range(0),
    "dropout": _FRACTION,
    "label_smoothing": _FRACTION,
}


def check_option(name: str, value):
    """``value`` if option ``name`` may take it (numbers converted to int/float), else CovidxrError in one
    line naming the option and the value."""
    allowed = CONSTRAINTS[name]
    if isinstance(allowed, tuple):
        if value not in allowed:
            raise CovidxrError(f"config: {name} must be one of {', '.join(allowed)}, not {value!r}")
        return value
    kind = int if allowed.integer else float
    try:
        if isinstance(value, bool) or (allowed.integer and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        kind_name = "a whole number" if allowed.integer else "a number"
        raise CovidxrError(f"config: {name} must be {kind_name}, not {value!r}") from None
    if not allowed.contains(number):
        raise CovidxrError(f"config: {name} must be {allowed.describe()}, not {value!r}")
    return number


@dataclass
class TrainConfig:
    """Defaults are the preprint's: frozen ImageNet backbone, new head, 80 epochs of Adam at 1e-3,
    batch 15, categorical cross-entropy, 237x237 RGB input, 80/10/10 split."""

    model: str = "efficientnet_lite0"
    image_size: int = 237
    epochs: int = 80
    batch_size: int = 15
    learning_rate: float = 0.001
    optimizer: str = "adam"
    hidden_units: int = 256
    dropout: float = 0.5
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    group_near_duplicates: bool = True
    allow_near_duplicate_leakage: bool = False
    extract_batch_size: int = 32
    num_workers: int = 1
    # Shortcut-resistant preprocessing (covidxr.runtime.preprocess.ImagePipeline), applied at training and prediction.
    intensity: str = "none"
    effective_resolution: int = 0
    crop_thorax: bool = False
    mask_text: bool = False
    # Lung-only input from the bundled lung segmenter (covidxr.runtime.lungs): none, crop (the lungs' box plus a
    # margin) or mask (outside the lungs set to a constant, soft edge). No lungs found: out of distribution.
    lungs: str = "none"
    # Acquisition-look augmentation (training only). With a frozen backbone and ``augment_views`` > 0, that
    # many augmented views per training image are encoded once and cached; otherwise augmentation is
    # drawn afresh every epoch and the feature cache is bypassed.
    augment: bool = False
    augment_views: int = 0
    # Gradient-reversal head that learns to tell the sources (``domain_column``) apart within a class.
    adversarial_weight: float = 0.0
    domain_column: str = "source"
    # Beyond the paper: unfreezing, sampling, regularisation and schedules.
    unfreeze_blocks: int = 0
    # Fine-tune on cached outputs of the frozen front (the backbone before the unfrozen blocks), encoded once
    # per image and cached view, instead of running the whole backbone on every image every epoch.
    cache_front: bool = False
    backbone_lr_scale: float = 0.1
    balanced_sampling: bool = False
    # Draw every (domain, class) group equally often, so no source dominates what the head learns.
    group_balanced_sampling: bool = False
    # flat: one softmax over the classes (the paper). staged: p(COVID-19) = p(abnormal) * p(COVID-19 | abnormal),
    # each decision learnt only from the domains that hold both of its sides (covidxr.lab.models.StagedHead).
    decision: str = "flat"
    label_smoothing: float = 0.0
    early_stopping_patience: int = 0
    schedule: str = "none"
    precision: str = "fp32"
    # What computes frozen backbone features: auto (onnxruntime on a CPU where installed), torch or onnx.
    feature_engine: str = "auto"

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        if isinstance(self.intensity, str):
            self.intensity = self.intensity.lower()  # ImagePipeline accepts any case
        for name in CONSTRAINTS:
            setattr(self, name, check_option(name, getattr(self, name)))
        if self.cache_front and not self.unfreeze_blocks:
            raise CovidxrError("config: cache_front needs unfreeze_blocks of 1 or more")
        if self.cache_front and self.augment and not self.augment_views:
            raise CovidxrError("config: cache_front with augment needs augment_views of 1 or more (cached views)")
        if self.decision == "staged" and self.adversarial_weight:
            raise CovidxrError("config: the staged decision cannot be combined with adversarial_weight")
        self.pipeline()  # validates the preprocessing options

    def pipeline(self) -> ImagePipeline:
        """The deterministic image preprocessing this configuration asks for."""
        return ImagePipeline(
            self.intensity, int(self.effective_resolution), bool(self.crop_thorax), bool(self.mask_text), self.lungs
        )

    @property
    def trains_on_images(self) -> bool:
        """True when the backbone's output changes during training, so cached features cannot be used."""
        return (self.unfreeze_blocks > 0 and not self.cache_front) or (self.augment and self.augment_views == 0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["split_fractions"] = list(self.split_fractions)
        return data

    def save(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if "engine" in data and "feature_engine" not in data:  # the key's name in configs saved before
            data = {("feature_engine" if key == "engine" else key): value for key, value in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CovidxrError(f"config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise CovidxrError(f"config: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        import yaml  # only where a config is read or written: prediction from a graph never needs it

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CovidxrError(f"{path}: not a readable YAML config ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise CovidxrError(f"{path}: a config must be a mapping of keys to values")
        return cls.from_dict(data)
