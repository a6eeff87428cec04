"""toushi (偷师): distil a strong reasoning model's emotional-support skill into a small student."""

__version__ = "0.1.0"
