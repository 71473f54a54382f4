"""Build script. Metadata lives in pyproject.toml; this file exists for the compiled extension,
which later work adds (csrc/). Today the package is pure Python."""

from setuptools import setup

setup()
