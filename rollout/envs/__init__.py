"""Environments a multi-turn episode talks to, and adapters for third-party packages."""
