"""Test helpers shared by several test folders (import as ``helpers.<module>``; ``tests/`` is on
``sys.path`` under pytest, and the folder helpers put it there for subprocesses)."""
