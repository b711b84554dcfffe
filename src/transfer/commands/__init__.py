"""CLI commands, one module per area. Each module defines ``COMMANDS``."""
