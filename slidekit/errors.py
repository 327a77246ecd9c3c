"""A kept old import path: ``from slidekit.errors import SlideError`` worked before the layout change
moved the module to ``slidekit.base.errors``, and keeps working (a plain re-export, no warning).

New code imports the classes from ``slidekit`` (``from slidekit import SlideError``) or
``slidekit.base``. Imports: ``slidekit.base.errors`` only.
"""
from slidekit.base import errors as _errors
from slidekit.base.errors import *  # noqa: F403  (every error and warning class; base/errors.py's __all__)

__all__ = list(_errors.__all__)
