"""Package list for setuptools; all other metadata lives in pyproject.toml.

graphscale and its subpackages are discovered (as namespace-aware packages, so a folder is shipped even
before it has an ``__init__.py``), and the repo's top-level ``rules/`` directory is added as the package
``graphscale.rules`` (mapped by ``package-dir`` in pyproject.toml) so the rule files ship in the wheel and
resolve through ``importlib.resources.files("graphscale.rules")`` in editable installs too.
"""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["graphscale", "graphscale.*"], exclude=["*__pycache__*"])
setup(packages=sorted(set(packages) | {"graphscale.rules"}))
