"""The two shapes every record takes: a nested ``Part`` of a JSON file, and a whole-file ``Record`` with a format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from covidxr.runtime.errors import CovidxrError

__all__ = ["Interval", "Part", "Record", "read_json_file", "read_part", "read_parts"]

Interval = list[float] | None  # a 95% interval [low, high] as JSON stores it


def read_json_file(path: str | Path) -> Any:
    """A JSON file's value; a missing, unreadable or damaged file is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise CovidxrError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:
        raise CovidxrError(f"{path}: damaged ({exc})") from None


def _plain(value: Any) -> Any:
    """A record's value as JSON holds it (nested parts become objects)."""
    if isinstance(value, Part):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Part:
    """A JSON object read into attributes: every field defaults (older files lack some), keys it does not
    model are kept in ``rest``, and ``to_dict`` writes back what was read."""

    rest: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    # Fields written only when they hold a value (the writers leave these keys out at times).
    SPARSE: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        """How a field's JSON value becomes its attribute (nested parts override this)."""
        return value

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path = "") -> Self:
        names = {f.name for f in fields(cls)} - {"rest"}
        values = {key: cls._read(key, value) for key, value in data.items() if key in names}
        return cls(**values, rest={key: value for key, value in data.items() if key not in names})

    def omitted(self) -> set[str]:
        """The fields ``to_dict`` leaves out: the sparse ones that hold nothing."""
        return {name for name in self.SPARSE if getattr(self, name) is None}

    def to_dict(self) -> dict[str, Any]:
        skip = self.omitted() | {"rest"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip} | self.rest


def read_part(cls: type[Part], value: Any) -> Any:
    """A nested object read as ``cls``; anything else (an older or damaged file) as None."""
    return cls.from_dict(value) if isinstance(value, dict) else None


def read_parts(cls: type[Part], value: Any) -> dict[str, Any] | None:
    """A JSON object of nested objects (per class, per source), each read as ``cls`` (empty where damaged)."""
    return {key: read_part(cls, item) or cls() for key, item in value.items()} if isinstance(value, dict) else None


@dataclass(frozen=True)
class Record(Part):
    """A whole file: a part with a ``format``, which ``from_dict`` checks before reading anything."""

    WHAT: ClassVar[str] = "record"
    FORMATS: ClassVar[tuple[str, ...]] = ()  # the formats read, oldest first; the last one is written
    # The format of files written before the key existed.
    UNMARKED: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path = "") -> Self:
        """Read any format covidxr wrote; a newer or unknown one is refused in one line naming the file."""
        if not isinstance(data, dict):
            raise CovidxrError(f"{path}: not a covidxr {cls.WHAT} (not a JSON object)")
        data = data if "format" in data else {**data, "format": cls.UNMARKED}
        if data["format"] not in cls.FORMATS:
            raise CovidxrError(
                f"{path}: {cls.WHAT} format {data['format']!r} is not one this covidxr reads "
                f"({', '.join(cls.FORMATS)}); it was written by a newer covidxr: upgrade covidxr"
            )
        return super().from_dict(data, path)

    @classmethod
    def new(cls, values: dict[str, Any]) -> Self:
        """A record of the newest format from what a writer computed (nested objects as plain dicts)."""
        return cls.from_dict({**values, "format": cls.FORMATS[-1]})

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The record in the file at ``path``."""
        return cls.from_dict(read_json_file(path), path)
