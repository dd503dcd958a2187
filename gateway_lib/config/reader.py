"""Typed reads of app settings that record every problem instead of raising at the first."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlparse


class SettingsReader:
    """Typed reads of app settings that record problems instead of raising."""

    def __init__(self, raw: Mapping[str, str], known: Collection[str]) -> None:
        self.raw = raw
        self.known = known  # every setting a reader may ask for: a name missing there is a bug
        self.problems: list[str] = []

    @property
    def on_azure(self) -> bool:
        return bool(self.raw.get("WEBSITE_INSTANCE_ID"))

    def text(self, name: str) -> str | None:
        assert name in self.known, f"{name} missing from SETTING_NAMES"
        value = self.raw.get(name, "").strip()
        return value or None

    def csv(self, name: str) -> list[str]:
        return [item.strip() for item in (self.text(name) or "").split(",") if item.strip()]

    def json_list(self, name: str) -> list[str]:
        raw = self.text(name)
        if raw is None:
            return []
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problems.append(f"{name}: must be a JSON list of strings")
            return []
        return value

    def integer(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}: '{raw}' is not an integer")
            return default
        return self._bounded(name, value, lo, hi, default)

    def number(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}: '{raw}' is not a number")
            return default
        return self._bounded(name, value, lo, hi, default)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.text(name) or default
        if value not in options:
            self.problems.append(f"{name}: '{value}' is not one of {', '.join(options)}")
            return default
        return value

    def url(self, name: str) -> str | None:
        value = self.text(name)
        if value is not None:
            try:
                parsed = urlparse(value)
                parsed.port  # noqa: B018  # raises on a port that is not a number in 0..65535
            except ValueError:  # e.g. "https://[host/": an unclosed IPv6 bracket
                parsed = urlparse("")
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                # The value is not quoted: a webhook URL carries its secret in the path.
                self.problems.append(f"{name}: not an http(s) URL (scheme://host/...)")
                return None
        return value

    def _bounded(self, name: str, value: Any, lo: Any, hi: Any, default: Any) -> Any:
        # NaN compares false with everything: without the isfinite check it passes any bounds.
        if (isinstance(value, float) and not math.isfinite(value)) or (lo is not None and value < lo) or (
                hi is not None and value > hi):
            self.problems.append(f"{name}: {value} is outside {lo}..{hi}")
            return default
        return value
