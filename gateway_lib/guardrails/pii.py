"""Built-in PII detectors, enabled by name in GATEWAY_PII_PATTERNS (screening runs them; settings checks the names)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

Detector = Callable[[str], bool]


def _matches(pattern: re.Pattern[str], valid: Callable[[str], bool] = lambda _: True) -> Detector:
    return lambda text: any(valid(m.group()) for m in pattern.finditer(text))


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    # 13-19 digits, an issuer range of the major networks (2-6: Mastercard 2-series, Amex/Diners/JCB,
    # Visa, Mastercard, Discover/UnionPay), then the Luhn check digit: order numbers rarely pass all three.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn(digits)


def _iban(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1  # ISO 13616 / ISO 7064 MOD 97-10


def _phone(candidate: str) -> bool:
    return 10 <= len(re.sub(r"\D", "", candidate)) <= 15  # E.164 allows at most 15 digits


# Built-in PII detectors, enabled by name in GATEWAY_PII_PATTERNS. Each pattern anchors on
# non-word/non-digit boundaries so it starts once per run of candidate characters (no
# quadratic scans over a 400k-character prompt); validators cut false positives.
PII_DETECTORS: Mapping[str, Detector] = {
    # local@domain.tld, TLD of 2+ letters.
    "email": _matches(re.compile(r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}(?![\w-])")),
    # 13-19 digits, optionally grouped by single spaces or hyphens, issuer range + Luhn checked.
    "credit_card": _matches(re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"), _card),
    # US SSN written AAA-GG-SSSS, excluding numbers the SSA never issues (000, 666, 9xx; 00; 0000).
    # Bare 9-digit runs are not matched: too many other identifiers look like that.
    "us_ssn": _matches(re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")),
    # IBAN, compact or in groups of four, with a valid MOD 97 check.
    "iban": _matches(re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])"), _iban),
    # International (+CC then groups of 1-4 digits, 10-15 digits in all) or North American
    # (NXX) NXX-XXXX / NXX-NXX-XXXX. Local formats without a country code are not matched:
    # they collide with dates, amounts and ids.
    "phone": _matches(re.compile(
        r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}"
        r"|(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[-. ])[2-9]\d{2}[-. ]\d{4}(?!\w))"
    ), _phone),
}
PII_DETECTOR_NAMES: tuple[str, ...] = tuple(PII_DETECTORS)


def pii_problems(names: Sequence[str]) -> list[str]:
    """Configuration problems in GATEWAY_PII_PATTERNS (for settings validation)."""
    return [f"GATEWAY_PII_PATTERNS: unknown detector '{n}'; known: {', '.join(PII_DETECTOR_NAMES)}"
            for n in names if n.strip().lower() not in PII_DETECTORS]
