"""The package version, kept in one place (read by the build backend and by the library)."""

__version__ = "0.2.0"
