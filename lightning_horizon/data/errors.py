"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data or data settings: the message names the file, line or key at fault.

    Subclasses ``ValueError`` so that callers catching configuration errors catch it too; recipes let it propagate
    (non-zero exit) after printing the message.
    """
