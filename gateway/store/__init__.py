"""The gateway's durable state: devices, identities, enrollment keys, logins, map version."""

from gateway.store.records import (
    DeviceRecord,
    Enrolled,
    EnrollRequest,
    KeyRecord,
    KeySpec,
    LoginApproved,
    LoginCreated,
    LoginPoll,
    LoginRecord,
)
from gateway.store.store import DEFAULT_POOL, Store

__all__ = [
    "DEFAULT_POOL",
    "DeviceRecord",
    "EnrollRequest",
    "Enrolled",
    "KeyRecord",
    "KeySpec",
    "LoginApproved",
    "LoginCreated",
    "LoginPoll",
    "LoginRecord",
    "Store",
]
