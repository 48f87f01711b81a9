"""The training configuration: the paper's protocol as defaults, loadable from and saved as YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from covidxr.errors import CovidxrError


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

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        if self.optimizer not in {"adam", "sgd"}:
            raise CovidxrError(f"optimizer must be 'adam' or 'sgd', not {self.optimizer!r}")
        for name in ("image_size", "epochs", "batch_size", "extract_batch_size"):
            if int(getattr(self, name)) < 1:
                raise CovidxrError(f"config: {name} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise CovidxrError("config: dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["split_fractions"] = list(self.split_fractions)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
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
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CovidxrError(f"{path}: not a readable YAML config ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise CovidxrError(f"{path}: a config must be a mapping of keys to values")
        return cls.from_dict(data)
