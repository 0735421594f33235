"""bench: a language-model benchmark suite (Mikolov et al. 2011 and beyond)."""

__version__ = "0.1.0"
