"""Registry of lab scenarios: every module in this package with NAME and stages() is one.

A scenario (contract: `luoagent.lab.stage.StageContext`) exposes NAME, DESCRIPTION, optional MEMORY/SLOW/TIMEOUT/
KERNELS/FLAVOUR/RUN_DISK_SPARE_MB (free space the stages need on /lab), and stages()."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

from luoagent.errors import LabError, UsageError

DEFAULT_MEMORY = "1G"
#: seconds one stage may take before the host gives up on it (TCG is slow; nested QEMU slower)
DEFAULT_STAGE_TIMEOUT = 300.0


@dataclass(frozen=True)
class ScenarioInfo:
    name: str
    module: str          # dotted module name (what the VM imports)
    description: str
    memory: str
    slow: bool
    timeout: float
    kernels: tuple[str, ...] | None = None   # kernel series per stage (KERNELS), None: the lab kernel
    flavour: str = "custom-init"             # rootfs flavour (FLAVOUR): custom-init or systemd
    disk_spare_mb: int = 0   # free MB on the run disk (/lab) the stages write into (RUN_DISK_SPARE_MB)


def _info(mod: ModuleType) -> ScenarioInfo:
    missing = [a for a in ("NAME", "stages") if not hasattr(mod, a)]
    if missing:
        raise LabError(f"scenario module {mod.__name__} lacks {', '.join(missing)}")
    return ScenarioInfo(
        name=mod.NAME,
        module=mod.__name__,
        description=getattr(mod, "DESCRIPTION", "").strip(),
        memory=str(getattr(mod, "MEMORY", DEFAULT_MEMORY)),
        slow=bool(getattr(mod, "SLOW", False)),
        timeout=float(getattr(mod, "TIMEOUT", DEFAULT_STAGE_TIMEOUT)),
        kernels=tuple(str(k) for k in mod.KERNELS) if getattr(mod, "KERNELS", None) else None,
        flavour=_flavour(mod),
        disk_spare_mb=int(getattr(mod, "RUN_DISK_SPARE_MB", 0)),
    )


FLAVOURS = ("custom-init", "systemd")


def _flavour(mod: ModuleType) -> str:
    value = str(getattr(mod, "FLAVOUR", "custom-init"))
    if value not in FLAVOURS:
        raise LabError(f"scenario module {mod.__name__}: FLAVOUR {value!r} is not one of {', '.join(FLAVOURS)}")
    return value


def discover() -> tuple[dict[str, ScenarioInfo], dict[str, str]]:
    """(scenarios by NAME, broken modules -> error text). Broken modules never hide good ones."""
    found: dict[str, ScenarioInfo] = {}
    broken: dict[str, str] = {}
    for entry in sorted(pkgutil.iter_modules(__path__), key=lambda e: e.name):
        if entry.name.startswith("_"):
            continue
        modname = f"{__name__}.{entry.name}"
        try:
            mod = importlib.import_module(modname)
            if not hasattr(mod, "NAME"):
                continue  # a helper module, not a scenario
            info = _info(mod)
        except Exception as exc:  # a scenario writer's bug must not break the whole lab
            broken[modname] = f"{type(exc).__name__}: {exc}"
            continue
        if info.name in found:
            broken[modname] = f"duplicate scenario NAME {info.name!r} (also {found[info.name].module})"
            continue
        found[info.name] = info
    return found, broken


def resolve(names: list[str]) -> list[ScenarioInfo]:
    """ScenarioInfo for each requested name (dashes or underscores); UsageError names the known ones."""
    found, broken = discover()
    by_alias = {n.replace("_", "-"): i for n, i in found.items()}
    out = []
    for name in names:
        info = found.get(name) or by_alias.get(name.replace("_", "-"))
        if info is None:
            broken_hint = [m for m in broken if m.rsplit(".", 1)[-1] == name.replace("-", "_")]
            if broken_hint:
                raise LabError(f"scenario {name!r} cannot be loaded: {broken[broken_hint[0]]}")
            raise UsageError(f"unknown lab scenario {name!r}; known: {', '.join(sorted(found)) or '(none)'}"
                             " (see `luoagent lab list`)")
        if info in out:
            raise UsageError(f"lab scenario {info.name!r} given twice; run it in a second `lab run` instead")
        out.append(info)
    return out


def load(module: str) -> ModuleType:
    """Import a scenario module by dotted name (used inside the VM)."""
    return importlib.import_module(module)
