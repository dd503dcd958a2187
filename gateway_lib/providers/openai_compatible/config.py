"""The OpenAI-compatible provider's settings section: a default base URL and an optional API key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Catalogue
    from gateway_lib.config.reader import SettingsReader

NAME = "openai_compatible"
SETTING_NAMES = ("OPENAI_COMPATIBLE_BASE_URL", "OPENAI_COMPATIBLE_API_KEY")
# What App Service leaves in a setting whose Key Vault reference it could not resolve.
_UNRESOLVED = "@Microsoft.KeyVault("


@dataclass(frozen=True)
class OpenAICompatibleSettings:
    base_url: str | None  # ends before /chat/completions, e.g. https://api.openai.com/v1; a target may name its own
    api_key: str | None  # sent as a bearer token; None for an endpoint that takes none (on-prem vLLM, Ollama)


def read(env: SettingsReader) -> OpenAICompatibleSettings:
    return OpenAICompatibleSettings(base_url=env.url("OPENAI_COMPATIBLE_BASE_URL"),
                                    api_key=env.text("OPENAI_COMPATIBLE_API_KEY"))


def check(section: OpenAICompatibleSettings, catalogue: Catalogue, problems: list[str]) -> None:
    """Only a catalogue that routes here needs these settings: an unused provider never fails startup."""
    targets = [t for t in catalogue.targets.values() if t.provider == NAME]
    if any(not t.endpoint for t in targets) and not section.base_url:
        problems.append("OPENAI_COMPATIBLE_BASE_URL is required: the catalogue has openai_compatible targets "
                        "without an endpoint")
    if targets and (section.api_key or "").startswith(_UNRESOLVED):
        problems.append("OPENAI_COMPATIBLE_API_KEY is an unresolved Key Vault reference: check the secret and the "
                        "identity's access to the vault")
