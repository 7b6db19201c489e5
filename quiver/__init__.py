"""The `quiver` command line: the top layer, imported by nothing (see the README's architecture section)."""

__version__ = "0.1.0"
