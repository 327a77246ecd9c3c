"""The slidekit version, recorded in every checkpoint and output marker."""
__version__ = "0.1.0"
