"""reidcli: person re-identification with Vision Transformers (absolute vs relative position)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
