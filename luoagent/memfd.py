"""Public memfd helpers: ``from luoagent import memfd; fd = memfd.create("ram", 1 << 30)``.

A thin re-export of luoagent.adapters.memfd, so callers need not know the layer layout."""

from luoagent.adapters.memfd import (  # noqa: F401
    CHUNK,
    PATTERN_BLOCK,
    SEAL_EXEC,
    SEAL_FUTURE_WRITE,
    SEAL_GROW,
    SEAL_NAMES,
    SEAL_SEAL,
    SEAL_SHRINK,
    SEAL_WRITE,
    create,
    data_extents,
    fill_random,
    map,
    pattern,
    reopen,
    resize,
    seal,
    seal_names,
    seals,
    sha256,
    size,
    verify_pattern,
    write_pattern,
)

__all__ = ["CHUNK", "PATTERN_BLOCK", "SEAL_EXEC", "SEAL_FUTURE_WRITE", "SEAL_GROW", "SEAL_NAMES", "SEAL_SEAL",
           "SEAL_SHRINK", "SEAL_WRITE", "create", "data_extents", "fill_random", "map", "pattern",
           "reopen", "resize", "seal", "seal_names", "seals", "sha256", "size", "verify_pattern",
           "write_pattern"]
