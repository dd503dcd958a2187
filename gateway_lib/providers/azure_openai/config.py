"""Azure OpenAI's settings section: endpoint, api-version and how the gateway authenticates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Catalogue
    from gateway_lib.config.reader import SettingsReader

NAME = "azure_openai"
SETTING_NAMES = ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_VERSION", "AZURE_OPENAI_AUTH", "AZURE_OPENAI_API_KEY",
                 "AZURE_OPENAI_TOKEN_SCOPE")


@dataclass(frozen=True)
class AzureOpenAISettings:
    endpoint: str | None  # the default resource; a catalogue target may name its own
    api_version: str
    auth: str  # managed_identity | api_key (api_key: local/dev only)
    api_key: str | None
    token_scope: str


def read(env: SettingsReader) -> AzureOpenAISettings:
    section = AzureOpenAISettings(
        endpoint=env.url("AZURE_OPENAI_ENDPOINT"),
        api_version=env.text("AZURE_OPENAI_API_VERSION") or "2024-10-21",
        auth=env.choice("AZURE_OPENAI_AUTH", ("managed_identity", "api_key"), "managed_identity"),
        api_key=env.text("AZURE_OPENAI_API_KEY"),
        token_scope=env.text("AZURE_OPENAI_TOKEN_SCOPE") or "https://cognitiveservices.azure.com/.default",
    )
    if section.auth == "api_key" and not section.api_key:
        env.problems.append("AZURE_OPENAI_API_KEY is required when AZURE_OPENAI_AUTH=api_key")
    if env.on_azure and section.auth == "api_key":
        env.problems.append("AZURE_OPENAI_AUTH=api_key is for local development only; use managed_identity in Azure")
    return section


def check(section: AzureOpenAISettings, catalogue: Catalogue, problems: list[str]) -> None:
    uses_default = any(t.provider == NAME and not t.endpoint for t in catalogue.targets.values())
    if uses_default and not section.endpoint:
        problems.append("AZURE_OPENAI_ENDPOINT is required: the catalogue has Azure OpenAI targets without an endpoint")
