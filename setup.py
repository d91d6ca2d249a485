"""setuptools hook for what pyproject.toml cannot say: compile the cffi LUO shim.

Everything else about the package lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_shim.py:ffibuilder"])
