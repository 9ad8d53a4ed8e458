"""Package list for setuptools; all other metadata lives in pyproject.toml.

graphscale's own subpackages are discovered, and the repo's top-level ``rules/`` directory is added as the
package ``graphscale.rules`` (mapped by ``package-dir`` in pyproject.toml) so the rule files ship in the
wheel and resolve through ``importlib.resources.files("graphscale.rules")`` in editable installs too.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["graphscale", "graphscale.*"]) + ["graphscale.rules"])
