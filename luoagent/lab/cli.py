"""CLI for ``luoagent lab``: build, run, shell, selftests, list, demo.

Parses arguments, calls build.py/boot.py, prints human text or ``--json``; exit 1 when a scenario fails."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from luoagent import report
from luoagent.report import Progress
from luoagent.errors import UsageError
from luoagent.lab import cache, demo

#: one-line help of `luoagent lab` (the CLI finds this module through the luoagent.commands entry point)
HELP = "build and run the nested LUO test lab"


def _common(p: argparse.ArgumentParser, kernel: bool = True) -> None:
    if kernel:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--kernel", metavar="BZIMAGE", help="use this LUO bzImage instead of building one")
        g.add_argument("--kernel-src", metavar="DIR", help="build the lab kernel from this source tree")
        g.add_argument("--kernel-version", metavar="SERIES", choices=["7.2", "7.3"], default="7.2",
                       help="Debian linux-source-SERIES to build the lab kernel from (default 7.2)")
    p.add_argument("--cache-dir", metavar="DIR", help="lab cache (default $LUOAGENT_CACHE or ~/.cache/luoagent)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("build", help="build (or fetch from cache) kernel, rootfs, shim, guest, selftests")
    _common(p)
    p.add_argument("--no-selftests", action="store_true", help="do not build the kernel's LUO selftests")
    p.add_argument("--flavour", choices=["custom-init", "systemd"], default="custom-init",
                   help="also build this rootfs flavour (systemd: Debian sid, systemd 262 as PID 1)")

    p = sub.add_parser("run", help="run scenarios in the lab VM (real kexecs between stages)")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="scenario names (`luoagent lab list`)")
    p.add_argument("--all", action="store_true", help="every scenario not marked slow")
    p.add_argument("--slow", action="store_true", help="with --all: the slow ones too")
    _common(p)
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML here")
    p.add_argument("--debug", action="append", default=[], metavar="KEY[=VAL]",
                   help="debug switch passed to the scenarios as ctx.debug (repeatable)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-stage time limit for every scenario")
    p.add_argument("--console", action="store_true", help="echo the VM's serial console to stderr")

    p = sub.add_parser("selftests", help="run the kernel's own LUO selftests in the lab VM")
    p.add_argument("names", nargs="*", metavar="NAME", help="selftests to run (default: all built)")
    _common(p)
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML here")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="per-stage time limit")
    p.add_argument("--console", action="store_true", help="echo the VM's serial console to stderr")

    p = sub.add_parser("shell", help="boot the lab VM with its serial console on this terminal")
    _common(p)
    p.add_argument("--memory", default="1G", help="VM RAM (default 1G)")
    p.add_argument("--flavour", choices=["custom-init", "systemd"], default="custom-init",
                   help="rootfs flavour to boot (systemd: systemd 262 as PID 1)")

    p = sub.add_parser("list", help="list the lab scenarios")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    p = sub.add_parser("demo", help="live-update the lab kernel under a running VM (end-to-end demo)")
    _common(p)
    demo.configure(p)


def parse_debug(items: list[str]) -> dict:
    """``["corrupt", "size=4096", "mode=x"]`` -> ``{"corrupt": True, "size": 4096, "mode": "x"}``."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not key or not key.replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"bad --debug {item!r}: expected KEY or KEY=VALUE (KEY letters, digits, - and _)")
        if not sep:
            out[key] = True
        else:
            try:
                out[key] = int(value, 0)
            except ValueError:
                out[key] = value
    return out


def _progress(args) -> Progress:
    return Progress("lab")


def _lab(args, selftests: bool = True):
    from luoagent.lab.build import build_lab

    return build_lab(kernel=getattr(args, "kernel", None), kernel_src=getattr(args, "kernel_src", None),
                     progress=_progress(args), selftests=selftests,
                     kernel_version=getattr(args, "kernel_version", "7.2"))


def run(args) -> int:
    if getattr(args, "cache_dir", None):
        cache.set_cache_dir(args.cache_dir)
    action = args.lab_command
    if action == "list":
        return _list(args)
    if action == "demo":
        return _demo(args)
    if action == "build":
        lab = _lab(args, selftests=not args.no_selftests)
        if args.flavour != "custom-init":
            lab.flavour_rootfs(args.flavour, _progress(args))
        if args.json:
            print(json.dumps({"ok": True, **lab.to_json()}, indent=1))
        else:
            for key, value in lab.to_json().items():
                if key != "timings":
                    print(f"{key:11} {value}")
            print("timings     " + ", ".join(f"{k} {v:.1f}s" for k, v in lab.timings.items()))
        return 0
    if action == "shell":
        return _lab(args, selftests=False).shell(memory=args.memory, flavour=args.flavour)
    if action == "run":
        debug = parse_debug(args.debug)
        from luoagent.lab.scenarios import resolve

        names = list(args.scenarios)
        if args.all:
            from luoagent.lab.scenarios import discover

            found = discover()[0]
            extra = [n for n, i in found.items() if (args.slow or not i.slow) and n not in names]
            # one VM per MEMORY size: keep equal sizes together (stable, so order is otherwise kept)
            names += sorted(extra, key=lambda n: _memory_bytes(found[n].memory))
        if not names:
            raise UsageError("name at least one scenario, or --all (see `luoagent lab list`)")
        resolve(names)  # bad names fail before any build
        lab = _lab(args, selftests=False)
        result = lab.run(names, debug=debug, timeout=args.timeout, progress=_progress(args),
                         echo=_echo if args.console else None)
        return _report(args, result)
    if action == "selftests":
        lab = _lab(args, selftests=True)
        result = lab.run_selftests(args.names or None, timeout=args.timeout, progress=_progress(args),
                                   echo=_echo if args.console else None)
        return _report(args, result)
    raise UsageError(f"unknown lab action {action!r}")


def _memory_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text) << 20 if text.isdigit() else 0


def _echo(line: str) -> None:
    report.echo("console", line)


def _report(args, result) -> int:
    if args.junit:
        Path(args.junit).write_text(result.junit())
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0 if result.ok else 1
    for sc in result.scenarios.values():
        mark = "ok    " if sc.passed else "FAILED"
        secs = sum(sc.stage_seconds)
        print(f"{mark} {sc.name}: {len(sc.tests)} results, {len(sc.failed_tests)} failed, "
              f"{sc.stages_started} stages ({secs:.1f}s in stages)" + (f" — {sc.error}" if sc.error else ""))
        for t in sc.failed_tests:
            print(f"    not ok {t.number} {t.description}")
            for d in t.diag[:30]:
                print(f"        # {d}")
    for e in result.errors:
        print(f"error: {e}")
    print(f"{'PASS' if result.ok else 'FAIL'}: {result.boots} boots, {result.duration:.1f}s; "
          f"console: {result.console_log}")
    if not result.ok:
        report.echo("lab", f"--- last 50 console lines ---\n{result.tail(50)}")
    return 0 if result.ok else 1


def _list(args) -> int:
    from luoagent.lab.scenarios import discover

    found, broken = discover()
    if args.json:
        print(json.dumps({"scenarios": [{"name": i.name, "description": i.description, "memory": i.memory,
                                         "slow": i.slow, "timeout": i.timeout} for i in found.values()],
                          "broken": broken}, indent=1))
        return 0
    width = max((len(n) for n in found), default=4)
    for info in found.values():
        print(f"{info.name:{width}}  {info.memory:>4}{'  slow' if info.slow else ''}  {info.description}")
    for mod, err in broken.items():
        report.echo("lab", f"BROKEN {mod}: {err}")
    return 0 if not broken else 1


def _demo(args) -> int:
    return int(demo.run(args) or 0)
