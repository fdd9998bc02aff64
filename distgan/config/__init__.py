"""A run's configuration: documented dataclasses by concern (model.py, sections.py), each field's
rules beside it (rules.py), a TOML file (config.py) and command-line flags over it (flags.py)."""
