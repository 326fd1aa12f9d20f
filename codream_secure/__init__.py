"""CoDream core: heterogeneous clients learning from securely aggregated dreams."""

__version__ = "0.1.0"
