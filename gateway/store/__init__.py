"""The gateway's durable state: devices, identities, enrollment keys, logins, map version."""

from gateway.store.lifecycle import IdentityRecord, KeyLifetime
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
    Removal,
)
from gateway.store.store import DEFAULT_POOL, Store

__all__ = [
    "DEFAULT_POOL",
    "DeviceRecord",
    "EnrollRequest",
    "Enrolled",
    "IdentityRecord",
    "KeyLifetime",
    "KeyRecord",
    "KeySpec",
    "LoginApproved",
    "LoginCreated",
    "LoginPoll",
    "LoginRecord",
    "Removal",
    "Store",
]
