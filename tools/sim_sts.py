"""An STS stand-in for ``AssumeRoleWithWebIdentity`` (query protocol, XML answers).

The web identity token is decoded without verifying its signature: the simulator only
records the claims (for tests) and optionally checks ``aud``, which is the mistake a
misconfigured federated credential produces in real life.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import uuid
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from .sim_http import Request, Send, drop_connection, send_bytes
from .sim_state import SimState, take_fault

PROVIDER = "sts"
TARGET = "sts"
_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
_STATUS_CODES = {400: "InvalidIdentityToken", 403: "AccessDenied", 429: "Throttling", 500: "InternalFailure",
                 503: "ServiceUnavailable"}


class StsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def handle_sts(request: Request, state: SimState, send: Send) -> None:
    """``POST /`` with a form body, as botocore's STS client sends it."""
    form = {k: v[-1] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}
    try:
        claims = _check(form, state)
        await _answer(form, claims, state, send)
    except StsError as exc:
        await send_bytes(send, exc.status, error_xml(exc), "text/xml")


def _check(form: dict[str, str], state: SimState) -> dict[str, Any]:
    if form.get("Action") != "AssumeRoleWithWebIdentity":
        raise StsError(400, "InvalidAction", f"Could not find operation {form.get('Action')} for version 2011-06-15")
    for name in ("RoleArn", "WebIdentityToken", "RoleSessionName"):
        if not form.get(name):
            raise StsError(400, "MissingParameter", f"The request must contain the parameter {name}")
    claims = unverified_claims(form["WebIdentityToken"])
    state.stats.record_sts(claims, form["RoleArn"], form["RoleSessionName"])
    if claims is None:
        raise StsError(400, "InvalidIdentityToken", "The web identity token that was passed could not be parsed.")
    expected = state.config.sts_audience
    aud = claims.get("aud")
    audiences: list[Any] = aud if isinstance(aud, list) else [aud]
    if expected and expected not in audiences:
        raise StsError(400, "InvalidIdentityToken", "Incorrect token audience")
    return claims


async def _answer(form: dict[str, str], claims: dict[str, Any], state: SimState, send: Send) -> None:
    fault = await take_fault(state, PROVIDER, TARGET)
    if fault is None:
        await send_bytes(send, 200, success_xml(form, claims, state.config.sts_expiry_seconds), "text/xml")
    elif fault.mode == "cut":
        await drop_connection(send)
    elif fault.mode == "malformed":
        await send_bytes(send, 200, b"<AssumeRoleWithWebIdentityResponse><Assume", "text/xml")
    else:
        code = fault.error_type or _STATUS_CODES.get(fault.status, "InternalFailure")
        raise StsError(fault.status, code, fault.message or f"Simulated STS error {fault.status}.")


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The JWT payload, signature unchecked; ``None`` if it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def success_xml(form: dict[str, str], claims: dict[str, Any], expiry_seconds: int) -> bytes:
    role_arn, session = form["RoleArn"], form["RoleSessionName"]
    account = role_arn.split(":")[4] if role_arn.count(":") >= 5 else "000000000000"
    role_name = role_arn.rsplit("/", 1)[-1]
    expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expiry_seconds))
    audience = claims.get("aud")
    values = {
        "sub": str(claims.get("sub", "")), "aud": str(audience[0] if isinstance(audience, list) else audience),
        "iss": str(claims.get("iss", "")), "arn": f"arn:aws:sts::{account}:assumed-role/{role_name}/{session}",
        "role_id": f"AROASIMULATOR{role_name.upper()[:8]}:{session}", "key": f"ASIASIM{secrets.token_hex(6).upper()}",
        "secret": secrets.token_urlsafe(30), "token": secrets.token_urlsafe(96), "expiration": expiration,
    }
    v = {k: escape(val) for k, val in values.items()}
    return f"""<AssumeRoleWithWebIdentityResponse xmlns="{_NS}">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>{v["sub"]}</SubjectFromWebIdentityToken>
    <Audience>{v["aud"]}</Audience>
    <AssumedRoleUser>
      <Arn>{v["arn"]}</Arn>
      <AssumedRoleId>{v["role_id"]}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>{v["key"]}</AccessKeyId>
      <SecretAccessKey>{v["secret"]}</SecretAccessKey>
      <SessionToken>{v["token"]}</SessionToken>
      <Expiration>{v["expiration"]}</Expiration>
    </Credentials>
    <Provider>{v["iss"]}</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>{uuid.uuid4()}</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
""".encode()


def error_xml(error: StsError) -> bytes:
    kind = "Receiver" if error.status >= 500 else "Sender"
    return f"""<ErrorResponse xmlns="{_NS}">
  <Error>
    <Type>{kind}</Type>
    <Code>{escape(error.code)}</Code>
    <Message>{escape(error.message)}</Message>
  </Error>
  <RequestId>{uuid.uuid4()}</RequestId>
</ErrorResponse>
""".encode()
