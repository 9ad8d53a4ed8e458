"""Declarative widening rules (``*.toml``), shipped as the package ``graphscale.rules``.

Read them with ``importlib.resources.files("graphscale.rules")``.
"""
