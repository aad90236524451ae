"""The user-facing applications: the `hanlin` command (cli.py); the terminal app (tui/) and the
OpenAI-compatible server (server/) arrive with their issues."""
