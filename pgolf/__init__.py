"""pgolf: a cached pipeline for the Parameter Golf challenge."""

__version__ = "0.1.0"
