"""SegEarth-R2 in JAX/Flax: free-form language about a remote-sensing image -> pixel masks."""

__version__ = "0.1.0"
