"""The API's refusal and enrollment counters (Prometheus default registry, next to the broker's).

* ``wiregate_api_rejected_total{route, status, reason}``: every request the API
  refused with a 4xx, by route template, status and the error's stable code
  (``invalid_token``, ``invalid_auth_key``, ``invalid_field``,
  ``payload_too_large``...: the ``error`` of the JSON body). Token validation
  failures, login refusals and bad input all land here, on their route.
* ``wiregate_enrollments_total{method}``: devices enrolled, by credential
  (``auth_key`` or ``workload_token``).
* ``wiregate_enrollment_refusals_total{method, reason}``: enrollments refused
  after the body was read, by credential and error code.

Labels are bounded: routes are templates, reasons are the codes of
:mod:`wiregate.errors` and HTTP reason phrases.
"""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["ENROLLMENTS", "ENROLLMENT_REFUSALS", "METHODS", "REJECTED", "count_rejected"]

#: The credentials a device enrolls with.
METHODS = ("auth_key", "workload_token")

REJECTED = Counter(
    "wiregate_api_rejected",
    "API requests refused with a 4xx, by route template, status and error code.",
    ["route", "status", "reason"],
)
ENROLLMENTS = Counter("wiregate_enrollments", "Devices enrolled, by credential.", ["method"])
ENROLLMENT_REFUSALS = Counter(
    "wiregate_enrollment_refusals",
    "Enrollments refused, by credential and error code.",
    ["method", "reason"],
)
for _method in METHODS:
    ENROLLMENTS.labels(method=_method)


def count_rejected(route: str, status: int, reason: str) -> None:
    """Count one refused request (5xx are not refusals of input: they are left out)."""
    if 400 <= status < 500:
        REJECTED.labels(route=route, status=str(status), reason=reason).inc()
