"""Command groups that cli.py registers; each module exposes register(app)."""
