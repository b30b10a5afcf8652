"""Shared pytest set-up: the `slow` marker and the repository root on the import path come
from pyproject.toml ([tool.pytest.ini_options])."""
