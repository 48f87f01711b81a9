"""Class activation maps through the ``grad-cam`` package, and checks of whether a map is worth looking at.

The paper showed Grad-CAM maps and found "no clear visual pattern". covidxr measures three things a
reader should know before trusting a map:

* **faithfulness**: does keeping only what the map highlights preserve the model's confidence better
  than a random map does (``CamMultImageConfidenceChange`` against ``RandomCAM`` on the same images,
  a one-sided Wilcoxon signed-rank test at 5%)?
* **where the mass sits**: the share of the map inside the central lung field versus the image
  border and corners, against the share a uniform map would have (geometry in ``REGIONS``);
* **model dependence**: the rank correlation between maps of the trained head and of a re-initialised
  head; a high correlation means the map reflects the image, not what the model learned.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, RandomCAM, ScoreCAM
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from scipy.stats import spearmanr, wilcoxon
from torch import nn

from covidxr.lab.models import CovidxrNet, run_model
from covidxr.runtime.cam import empty_map, lung_shares, lungs_on_input
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runs import Run

__all__ = [
    "torch_cam_maps",
    "BORDER_WIDTH",
    "Explainer",
    "GEOMETRY_DESCRIPTION",
    "LUNG_FIELD",
    "METHODS",
    "MapChecks",
    "check_maps",
    "input_lungs",
    "probabilities_of",
    "region_masks",
]

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "eigencam": EigenCAM}
# ScoreCAM runs one forward pass per feature channel (1,280-2,048 here): too slow to check routinely.
CHECKED_METHODS = ("gradcam", "gradcam++", "eigencam")

# Fractions of the (square, resized) model input. The lung field of a frontal chest X-ray lies
# roughly in the central 70% of the width and height; the border strip and the corner squares are
# where burnt-in markers, text and collimation edges usually sit.
LUNG_FIELD = (0.15, 0.15, 0.85, 0.85)  # x0, y0, x1, y1
BORDER_WIDTH = 0.10
CORNER_SIZE = 0.20
GEOMETRY_DESCRIPTION = (
    f"lung field = central box x,y in [{LUNG_FIELD[0]:.2f}, {LUNG_FIELD[2]:.2f}] of the input; "
    f"border = outer {BORDER_WIDTH:.0%} strip on every side; corners = four {CORNER_SIZE:.0%} x "
    f"{CORNER_SIZE:.0%} squares"
)
RANDOMISATION_LIMIT = 0.5  # mean Spearman correlation above this: maps barely depend on the trained head


def region_masks(size: int) -> dict[str, np.ndarray]:
    """Boolean masks of the documented regions for a ``size`` x ``size`` input."""
    grid = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(grid, grid)
    x0, y0, x1, y1 = LUNG_FIELD
    lung = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    border = (x < BORDER_WIDTH) | (x > 1 - BORDER_WIDTH) | (y < BORDER_WIDTH) | (y > 1 - BORDER_WIDTH)
    near_x = (x < CORNER_SIZE) | (x > 1 - CORNER_SIZE)
    near_y = (y < CORNER_SIZE) | (y > 1 - CORNER_SIZE)
    return {"lung_field": lung, "border": border, "corners": near_x & near_y}


def target_layer(model: CovidxrNet) -> nn.Module:
    """The registry's Grad-CAM layer of this model, or a clear error when the network lacks it."""
    name = model.spec.gradcam_layer
    try:
        return model.backbone.body.get_submodule(name)
    except AttributeError:
        raise CovidxrError(f"{model.spec.name}: Grad-CAM target layer {name!r} does not exist in the network") from None


class Explainer:
    """One CAM object per model and method: hooks are registered once and reused for every batch."""

    def __init__(self, model: CovidxrNet, method: str = "gradcam"):
        if method not in METHODS and method != "random":
            raise CovidxrError(f"unknown explanation method {method!r}; choose one of: {', '.join(METHODS)}")
        self.model = model
        self.method = method
        cam_class = RandomCAM if method == "random" else METHODS[method]
        self.cam = cam_class(model=model, target_layers=[target_layer(model)])

    def __call__(self, inputs: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        """Maps in [0, 1] at the input's resolution, one per image, for the given class of each."""
        # The backbone is frozen, so gradients reach the target layer only through the input.
        inputs = inputs.detach().clone().requires_grad_(True)
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        return self.cam(input_tensor=inputs, targets=targets)


@torch.no_grad()
def probabilities_of(model: CovidxrNet, inputs: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.softmax(model(inputs), dim=1).numpy()


def input_lungs(model: CovidxrNet, image: Image.Image, hand_mask: np.ndarray | None = None) -> np.ndarray | None:
    """``covidxr.runtime.cam.lungs_on_input`` on this model's input grid and pipeline."""
    return lungs_on_input(model.image_size, model.pipeline, image, hand_mask)


# ---------------------------------------------------------------------------------------------
# Are the maps meaningful?
# ---------------------------------------------------------------------------------------------


@dataclass
class MapChecks:
    confidence_change: float
    random_confidence_change: float
    better_than_random_share: float
    better_than_random_p: float
    mass: dict[str, float]
    randomised_head_rank_correlation: float

    def to_dict(self, area: dict[str, float]) -> dict:
        flags = []
        better = self.better_than_random_p < 0.05
        if not better:
            flags.append(
                "keeping what the map highlights preserves the prediction no better than a random map "
                f"(mean confidence change {self.confidence_change:+.3f} vs {self.random_confidence_change:+.3f}, "
                f"one-sided Wilcoxon p={self.better_than_random_p:.2f})"
            )
        if self.randomised_head_rank_correlation > RANDOMISATION_LIMIT:
            flags.append(
                f"maps barely change when the trained head is replaced by a random one (rank correlation "
                f"{self.randomised_head_rank_correlation:.2f}): they reflect the image, not the model"
            )
        if self.mass["lung_field"] < area["lung_field"]:
            flags.append(
                f"less map mass in the lung field ({self.mass['lung_field']:.0%}) than a uniform map would put "
                f"there ({area['lung_field']:.0%}): the model may look outside the lungs"
            )
        if self.mass["border"] > area["border"] or self.mass["corners"] > area["corners"]:
            flags.append(
                f"map mass on the border ({self.mass['border']:.0%}, uniform {area['border']:.0%}) or corners "
                f"({self.mass['corners']:.0%}, uniform {area['corners']:.0%}): likely shortcuts (markers, text, edges)"
            )
        failed = not better or self.randomised_head_rank_correlation > RANDOMISATION_LIMIT
        return {
            "confidence_change": self.confidence_change,
            "random_confidence_change": self.random_confidence_change,
            "better_than_random": bool(better),
            "better_than_random_share": self.better_than_random_share,
            "better_than_random_p": self.better_than_random_p,
            "mass": self.mass,
            "randomised_head_rank_correlation": self.randomised_head_rank_correlation,
            "flags": flags,
            "verdict": "fail" if failed else "warning" if flags else "pass",
        }


def _confidence_change(model: CovidxrNet, inputs: torch.Tensor, maps: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Change of the predicted class's probability when the input is multiplied by the map."""
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    with torch.no_grad():
        return np.asarray(CamMultImageConfidenceChange()(inputs, maps, targets, model), dtype=np.float64).ravel()


def _paired_p_value(change: np.ndarray, random_change: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p-value that the map preserves confidence better than random."""
    if np.allclose(change, random_change):
        return 1.0
    return float(wilcoxon(change, random_change, alternative="greater").pvalue)


def _mass_shares(maps: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    totals = maps.reshape(len(maps), -1).sum(1) + 1e-12
    return {name: float(np.mean(maps[:, mask].sum(1) / totals)) for name, mask in masks.items()}


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _lung_mass(maps: np.ndarray, lungs: Sequence[np.ndarray | None], classes, covid_class: int | None) -> dict:
    """Mean share of map mass inside the lungs, against the lungs' share of the input (a uniform map's). An empty
    (all-zero) map has no mass: it is counted in ``empty_maps``, never averaged in as 0% inside."""
    shares = lung_shares(maps, lungs)
    empty = np.array([empty_map(cam) for cam in maps], dtype=bool)
    known = ~np.isnan(shares)
    area = np.array([np.nan if m is None else m.mean() for m in lungs], dtype=np.float64)
    covid = known & (np.asarray(classes) == covid_class)
    return {
        "share": _mean_or_none(shares[known]),
        "uniform_share": _mean_or_none(area[known]),
        "n": int(known.sum()),
        "covid_calls_share": _mean_or_none(shares[covid]),
        "covid_calls_n": int(covid.sum()),
        "lungs_not_found": int((~known & ~empty).sum()),
        "empty_maps": int(empty.sum()),
    }


def _rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    values = []
    for a, b in zip(first, second, strict=True):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            values.append(1.0 if np.ptp(a) == np.ptp(b) else 0.0)
            continue
        values.append(spearmanr(a.ravel(), b.ravel()).statistic)
    return float(np.mean(values))


def check_maps(
    model: CovidxrNet,
    inputs: torch.Tensor,
    methods: Sequence[str] = CHECKED_METHODS,
    seed: int = 0,
    lungs: Sequence[np.ndarray | None] | None = None,
    covid_class: int | None = None,
) -> dict:
    """The three checks for each method on a batch of preprocessed images (explained for their predicted
    class); with ``lungs`` (``input_lungs`` per image) also the share of each map's mass inside the lungs,
    over all images and over those predicted ``covid_class``."""
    classes = probabilities_of(model, inputs).argmax(1)
    masks = region_masks(model.image_size)
    area = {name: float(mask.mean()) for name, mask in masks.items()}
    np.random.seed(seed)  # RandomCAM draws its weights from numpy's global generator
    random_maps = Explainer(model, "random")(inputs, classes)
    random_change = _confidence_change(model, inputs, random_maps, classes)
    randomised = copy.deepcopy(model)
    torch.manual_seed(seed + 1)
    for layer in randomised.head.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    report = {}
    for method in methods:
        maps = Explainer(model, method)(inputs, classes)
        change = _confidence_change(model, inputs, maps, classes)
        checks = MapChecks(
            confidence_change=float(change.mean()),
            random_confidence_change=float(random_change.mean()),
            better_than_random_share=float((change > random_change).mean()),
            better_than_random_p=_paired_p_value(change, random_change),
            mass=_mass_shares(maps, masks),
            randomised_head_rank_correlation=_rank_correlation(maps, Explainer(randomised, method)(inputs, classes)),
        )
        report[method] = checks.to_dict(area)
        if lungs is not None:
            report[method]["lungs"] = _lung_mass(maps, lungs, classes, covid_class)
    return {
        "n_images": len(inputs),
        "geometry": {"description": GEOMETRY_DESCRIPTION, "area": area},
        "randomisation_limit": RANDOMISATION_LIMIT,
        "methods": report,
    }


def torch_cam_maps(run: Run, inputs: np.ndarray, classes: np.ndarray, method: str) -> np.ndarray:
    """CAM maps of ``run``'s torch model by pytorch-grad-cam (entry point ``covidxr.cam``, used by the runtime
    for the methods its numpy Grad-CAM does not cover)."""
    return Explainer(run_model(run), method)(torch.from_numpy(inputs), classes.tolist())
