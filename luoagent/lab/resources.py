"""Where the lab finds what it builds from: kernel config fragments, rootfs recipes, guest sources,
its PID 1 script, the systemd flavour's stage unit and the C shim sources; all ship inside the installed package.

A checkout and a wheel look the same from here: `luoagent/lab/{kernel-configs,vm-images,init}` are
package data, and `csrc/` is installed as the data package `luoagent._csrc` (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import luoagent
from luoagent.errors import LabBuildError

LAB_DIR = Path(__file__).resolve().parent
#: the directory holding the `luoagent` package (what the lab VM puts on PYTHONPATH)
PACKAGE_DIR = Path(luoagent.__file__).resolve().parent
KERNEL_CONFIGS = LAB_DIR / "kernel-configs"
VM_IMAGES = LAB_DIR / "vm-images"
GUEST_SOURCES = VM_IMAGES / "guest"
INIT_SCRIPT = LAB_DIR / "init"
#: the systemd flavour's stage launcher and the unit that starts it on every boot
SYSTEMD_STAGE = LAB_DIR / "systemd-stage"
SYSTEMD_STAGE_UNIT = LAB_DIR / "luoagent-lab-stage.service"
SYSTEMD_RUN_DISK_UNIT = LAB_DIR / "luoagent-lab-run-disk.service"


def shipped_units() -> Path:
    """The repository's systemd units (`systemd/`), which the systemd lab installs as a host would."""
    return require(PACKAGE_DIR.parent / "systemd", "the shipped systemd units (systemd/ of a checkout)")


def csrc_dir() -> Path:
    """The C shim sources: `luoagent/_csrc` in an installed wheel, `csrc/` in a checkout."""
    for candidate in (PACKAGE_DIR / "_csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "build_shim.py").is_file():
            return candidate
    raise LabBuildError(
        f"the C shim sources are missing: neither {PACKAGE_DIR / '_csrc'} nor "
        f"{PACKAGE_DIR.parent / 'csrc'} holds build_shim.py; reinstall luoagent from a wheel or "
        "checkout that includes csrc/ (pip install .)"
    )


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else LabBuildError naming what is missing and how to get it back."""
    if not path.exists():
        raise LabBuildError(
            f"{what} is missing: {path} does not exist; this luoagent installation lacks the "
            "lab's package data; reinstall it (pip install . from a checkout, or the wheel)"
        )
    return path
