"""Public LUO API: ``from luoagent.luo import LiveUpdate, Session``.

A thin re-export of luoagent.adapters.luo, so callers need not know the layer layout."""

from luoagent.adapters.luo import (  # noqa: F401
    DEVICE,
    IOCTL_NAMES,
    NAME_MAX_BYTES,
    TOKEN_MAX,
    LiveUpdate,
    Session,
    luo_error,
    validate_name,
    validate_token,
)

__all__ = ["DEVICE", "IOCTL_NAMES", "NAME_MAX_BYTES", "TOKEN_MAX", "LiveUpdate", "Session",
           "luo_error", "validate_name", "validate_token"]
