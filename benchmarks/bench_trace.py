"""Benchmark `luoagent trace` overhead: syscalls per second untraced vs traced, and the ratio.

Prints numbers only (no asserts). Run: .venv/bin/python benchmarks/bench_trace.py [--calls N]"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROG_SRC = REPO / "tests" / "trace_prog" / "luo_trace_prog.c"


def build(workdir: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("bench_trace: gcc not found (apt-get install gcc)")
    out = workdir / "luo_trace_prog"
    subprocess.run([gcc, "-O2", "-pthread", f"-I{REPO / 'csrc'}", "-o", str(out), str(PROG_SRC)], check=True)
    return out


def calls_per_second(argv: list[str]) -> float:
    """Run the program (maybe under the tracer) and read its own timing line: BENCH what n seconds."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("BENCH "))
    _, _, n, seconds = line.split()
    return int(n) / max(float(seconds), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000, help="syscalls per traced run (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args()
    trace = [sys.executable, "-m", "luoagent", "trace", "-o", "/dev/null"]
    with tempfile.TemporaryDirectory() as tmp:
        prog = str(build(Path(tmp)))
        cases = [
            ("LUO ioctl, decoded and shown", "luo", []),
            ("getppid, hidden (filtered at entry)", "getppid", []),
            ("getppid, shown with --all", "getppid", ["--all"]),
            ("LUO ioctl, --json", "luo", ["--json"]),
        ]
        print(f"{'case':40} {'untraced/s':>12} {'traced/s':>10} {'slowdown':>9}")
        for label, what, extra in cases:
            untraced = max(calls_per_second([prog, "bench", str(args.calls * 10), what]) for _ in range(args.repeat))
            traced = max(calls_per_second([*trace, *extra, "--", prog, "bench", str(args.calls), what])
                         for _ in range(args.repeat))
            print(f"{label:40} {untraced:12.0f} {traced:10.0f} {untraced / traced:8.1f}x")


if __name__ == "__main__":
    main()
