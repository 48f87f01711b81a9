"""Fine-tuning the last backbone blocks on cached outputs of the frozen front.

Fine-tuning the last one or two blocks changes only those blocks: everything before them (most of the
backbone's compute) is frozen, in inference mode, and gives the same map for an image every epoch. So
the front runs once per image (and per cached augmented view), its maps stay in memory, and each epoch
runs only the unfrozen blocks and the head. The result is the same as running the whole backbone on
every image every epoch with the same views, for a fraction of the time; it is what makes
leave-one-source-out, which retrains once per held-out unit, affordable for fine-tuned designs on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covidxr.lab.features import AugmentedView
from covidxr.lab.models import CovidxrNet
from covidxr.runtime.batches import iterate_batches
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256
from covidxr.runtime.storage import stable_digest

__all__ = ["FrontSplit", "front_maps", "split_model"]

# Maps computed in this process, by what determines them: shared by training and every retraining of
# leave-one-source-out in the same ``reproduce``.
_MEMO: dict[str, dict[str, torch.Tensor]] = {}


@dataclass
class FrontSplit:
    """A model cut before its last ``count`` blocks: the frozen ``front`` and the trainable ``tail``."""

    front: Callable[[torch.Tensor], torch.Tensor]
    tail: nn.Module
    count: int

    def fresh_tail(self) -> nn.Module:
        """A trainable copy of the tail as it is now (the pretrained blocks, for a retraining)."""
        tail = copy.deepcopy(self.tail)
        for parameter in tail.parameters():
            parameter.requires_grad_(True)
        return tail


def split_model(model: CovidxrNet, count: int) -> FrontSplit:
    """``model``'s backbone cut before its last ``count`` blocks; refused where the registry cannot cut it."""
    if model.spec.split is None:
        raise CovidxrError(
            f"{model.spec.name}: the registry cannot cut this backbone for cache_front; "
            "fine-tune it on images (cache_front: false)"
        )
    front, tail = model.spec.split(model.backbone.body, count)
    return FrontSplit(front, tail, count)


def _memo_key(model: CovidxrNet, count: int, view: AugmentedView | None) -> str:
    key = {
        "model": model.spec.name,
        "pretrained": model.weights.sha256,
        "preprocessing": model.preprocessing.to_dict(),
        "pipeline": model.pipeline.to_dict(),
        "image_size": model.image_size,
        "count": count,
        "view": view.key() if view else None,
    }
    return stable_digest(key)


@torch.no_grad()
def front_maps(
    model: CovidxrNet,
    split: FrontSplit,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    num_workers: int = 1,
    view: AugmentedView | None = None,
) -> torch.Tensor:
    """The front's output map for every image (of its augmented ``view``); an unreadable file is an error.
    Each image's map is computed once per process, whatever list it comes in."""
    paths = [Path(p) for p in paths]
    memo = _MEMO.setdefault(_memo_key(model, split.count, view), {})
    todo = sorted({str(p) for p in paths} - memo.keys())
    if todo:
        digests = [file_sha256(Path(p)) for p in todo] if view is not None else None
        batches = iterate_batches(
            [Path(p) for p in todo], model.input_transform, batch_size, num_workers, None, view, digests
        )
        model.eval()
        for indices, inputs, errors, *_ in batches:
            bad = [e for e in errors if e]
            if bad:
                raise CovidxrError(bad[0])
            for index, fmap in zip(indices, split.front(torch.from_numpy(inputs)), strict=True):
                memo[todo[index]] = fmap.clone()
    return torch.stack([memo[str(p)] for p in paths])
