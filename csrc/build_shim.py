"""cffi (API mode) builder for luoagent._luo_shim: compiles csrc/shim.c at install time.

Build-time only: runtime code imports the compiled module and never parses a header."""

import os
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "shim_cdef.h").read_text())

# LUOAGENT_KERNEL_HEADERS=DIR (a uapi include dir holding linux/liveupdate.h) makes the build
# prove luo_abi.h against that header; without it, the compiler's default headers are used.
_kernel_headers = os.environ.get("LUOAGENT_KERNEL_HEADERS")
ffibuilder.set_source(
    "luoagent._luo_shim",
    '#include "shim.c"',
    include_dirs=[str(CSRC)] + ([_kernel_headers] if _kernel_headers else []),
    depends=[str(p) for p in sorted(CSRC.glob("*.[ch]"))],
    extra_compile_args=["-Wall", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
