"""The task API's templates, validation and the parsed fields of its answers (classify, extract)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_lib.errors import InvalidRequest
from gateway_lib.operations import tasks
from gateway_lib.operations.schema import GenerateRequest


def job(**values: Any) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "Win a prize now!", **values})


@pytest.mark.parametrize(("answer", "label"), [
    ("spam", "Spam"), (" Spam.\n", "Spam"), ('"ham"', "Ham"), ("**SPAM**", "Spam"),
    ("I think this is probably spam, because it offers prizes.", None), ("spam or ham", None), ("", None),
])
def test_a_classification_is_one_of_the_labels_as_given_or_none(answer: str, label: str | None) -> None:
    assert tasks.classified(answer, ["Spam", "Ham"]) == label


@pytest.mark.parametrize(("answer", "fields"), [
    ('{"name": "Bob", "city": "Oslo"}', {"name": "Bob", "city": "Oslo"}),
    ('```json\n{"name": "Bob", "password": "hunter2"}\n```', {"name": "Bob", "city": None}),  # only what was asked
    ("Sure! The name is Bob and he lives in Oslo.", None), ('["Bob", "Oslo"]', None), ('{"name": "Bo', None),
])
def test_an_extraction_holds_exactly_the_requested_fields_or_is_none(answer: str, fields: dict | None) -> None:
    assert tasks.extracted(answer, ["name", "city"]) == fields


@pytest.mark.parametrize(("values", "param"), [
    ({"task": "classify", "labels": ["spam"]}, "labels"),
    ({"task": "classify", "labels": ["spam", "spam"]}, "labels"),
    ({"task": "classify", "labels": ["spam", "SPAM "]}, "labels"),
    ({"task": "classify", "labels": ["", " "]}, "labels"),
    ({"task": "classify", "labels": ["x" * 1_500, "y" * 1_500]}, "labels"),
    ({"task": "extract", "fields": [""]}, "fields"),
    ({"task": "extract", "fields": ["name", "name"]}, "fields"),
    ({"task": "extract"}, "fields"),
])
def test_labels_and_fields_that_mean_nothing_are_a_400_naming_them(values: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        tasks.to_chat(job(**values))
    assert (refused.value.status, refused.value.param) == (400, param)


def test_a_size_error_about_the_task_is_not_blamed_on_the_prompt_alone() -> None:
    error = tasks.in_task_terms(InvalidRequest("The prompt is 1321 characters; this gateway accepts at most 1000.",
                                               code="prompt_too_large", param="messages"))
    assert error.param == "prompt" and error.message.startswith("The prompt with the task's template is 1321")


@pytest.mark.parametrize(("labels", "answer"), [
    (["U.S.", "E.U."], "U.S."),
    (["Inc.", "Ltd."], "Ltd."),
    (["A*", "B"], "A*"),
    (["'90s", "'80s"], "'90s"),
])
def test_a_label_answered_exactly_as_given_is_recognised(labels: list[str], answer: str) -> None:
    assert tasks.classified(answer, labels) == answer


def test_an_exact_answer_is_not_taken_for_another_label() -> None:
    # Distinct labels to _names (compared after strip().casefold()); the answer "U.S." names the first one.
    assert tasks.classified("U.S.", ["U.S.", "U.S"]) == "U.S."
