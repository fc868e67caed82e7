"""emq's version: one place, importable by every module without importing the package's facade."""
__version__ = "0.1.0"
