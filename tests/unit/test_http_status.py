"""Every jobflow error says which HTTP status a web app answers with, so a host
maps them all with one exception handler (and every host maps them alike)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import jobflow
from jobflow import errors
from jobflow.errors import JobflowError, http_status_of


def _error_classes() -> list[type[JobflowError]]:
    """Every JobflowError subclass defined anywhere in jobflow (each module imported)."""
    for module in pkgutil.walk_packages(jobflow.__path__, "jobflow."):
        if not module.name.startswith("jobflow.migrations."):
            importlib.import_module(module.name)
    found: list[type[JobflowError]] = []
    pending = [JobflowError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("jobflow."):
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: (cls.__module__, cls.__qualname__))


ERRORS = _error_classes()


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__qualname__)
def test_every_error_has_an_http_status(cls: type[JobflowError]) -> None:
    assert isinstance(cls.http_status, int) and 400 <= cls.http_status <= 599


@pytest.mark.parametrize("cls", [cls for cls in ERRORS if JobflowError in cls.__bases__],
                         ids=lambda cls: cls.__qualname__)
def test_each_kind_of_error_chooses_its_status_itself(cls: type[JobflowError]) -> None:
    """A new kind of error (a direct child of JobflowError) must say its status
    rather than fall back to the root's 500 unnoticed."""
    assert "http_status" in vars(cls), f"{cls.__qualname__} does not set http_status"


@pytest.mark.parametrize(("error", "status"), [
    (errors.InvalidInput("bad"), 422),
    (errors.ContentTypeNotAllowed("text/html", frozenset({"video/mp4"})), 422),
    (errors.JobNotFound("j"), 404),
    (errors.MalformedJobId("../x"), 404),
    (errors.UploadMissing("j", "uploads/j"), 409),
    (errors.UploadRejected("j", "empty"), 422),
    (errors.UploadExpired("j"), 410),
    (errors.InvalidTransition("j", "done", "cancel"), 409),
    (errors.LeaseLost("j", "succeed"), 409),
    (errors.StorageUnavailable("down"), 503),
    (errors.ConfigurationError("wrong"), 500),
    (errors.StoragePermissionDenied("403"), 500),
    (errors.PermanentStorageError("refused"), 500),
    (RuntimeError("not ours"), 500),
])
def test_the_documented_statuses(error: BaseException, status: int) -> None:
    assert http_status_of(error) == status
