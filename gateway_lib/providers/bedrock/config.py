"""Bedrock's settings section: region, endpoint override and keyless federation from Entra."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway_lib.config.reader import SettingsReader

NAME = "bedrock"
SETTING_NAMES = ("BEDROCK_REGION", "BEDROCK_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_AUDIENCE",
                 "AWS_STS_ENDPOINT_URL", "AWS_ROLE_SESSION_NAME")


@dataclass(frozen=True)
class BedrockSettings:
    region: str
    endpoint_url: str | None  # override (simulator / VPC endpoint)
    role_arn: str | None  # keyless: web identity federation from Entra
    web_identity_audience: str | None
    sts_endpoint_url: str | None
    role_session_name: str


def read(env: SettingsReader) -> BedrockSettings:
    section = BedrockSettings(
        region=env.text("BEDROCK_REGION") or "us-east-1",
        endpoint_url=env.url("BEDROCK_ENDPOINT_URL"),
        role_arn=env.text("AWS_ROLE_ARN"),
        web_identity_audience=env.text("AWS_WEB_IDENTITY_AUDIENCE"),
        sts_endpoint_url=env.url("AWS_STS_ENDPOINT_URL"),
        role_session_name=env.text("AWS_ROLE_SESSION_NAME") or "ai-gateway",
    )
    if bool(section.role_arn) != bool(section.web_identity_audience):
        env.problems.append("AWS_ROLE_ARN and AWS_WEB_IDENTITY_AUDIENCE go together (keyless Bedrock federation)")
    return section
