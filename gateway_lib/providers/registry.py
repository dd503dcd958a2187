"""The provider registry: each provider folder registers itself here by name.

A provider package (``gateway_lib/providers/<name>/``) calls ``register`` from its ``__init__`` with
how to read its own settings section, how to build its adapter, and what each catalogue target of it
can do. Nothing outside the registry and the provider's folder names a provider: the catalogue,
the request models, the settings and the runtime ask the registry. Registering imports no SDK;
``build`` does, on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway_lib.providers.base import Capabilities

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Catalogue, Target
    from gateway_lib.config.reader import SettingsReader
    from gateway_lib.providers.base import Provider, ProviderSettings


def _no_check(section: Any, catalogue: Catalogue, problems: list[str]) -> None:
    return None


@dataclass(frozen=True)
class ProviderSpec:
    """How the gateway reads, builds and routes to one provider."""

    name: str
    setting_names: tuple[str, ...]  # the app settings its section reads (held together with infra by a test)
    read_settings: Callable[[SettingsReader], Any]  # its section; problems go to the reader
    build: Callable[[Any, ProviderSettings, Any], Provider]  # (section, shared settings, injected credential)
    capabilities: Callable[[Target], Capabilities]  # what one of its targets can do
    check: Callable[[Any, Catalogue, list[str]], None] = field(default=_no_check)  # cross-checks with the catalogue


_specs: dict[str, ProviderSpec] = {}
_loaded = False


def register(spec: ProviderSpec) -> ProviderSpec:
    _specs[spec.name] = spec
    return spec


def specs() -> Mapping[str, ProviderSpec]:
    """Every provider, each folder under ``gateway_lib/providers`` imported once (cheap: no SDKs)."""
    global _loaded
    if not _loaded:
        import gateway_lib.providers as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.ispkg:
                importlib.import_module(f"{package.__name__}.{info.name}")
        _loaded = True
    return _specs


def names() -> tuple[str, ...]:
    return tuple(sorted(specs()))


def capabilities(target: Target) -> Capabilities:
    spec = specs().get(target.provider)
    return spec.capabilities(target) if spec else Capabilities()
