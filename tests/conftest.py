"""The package and tests/_util.py are importable through pyproject's `[tool.pytest.ini_options] pythonpath`; every
subprocess a test starts gets the repository root as PYTHONPATH (tests/_util.py), so a clone or a git worktree always
tests its own code, never another installed copy."""
