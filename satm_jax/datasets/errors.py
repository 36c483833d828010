"""The one exception of the dataset package.

Every failure to find, read or decode a dataset's files, and every bad dataset request, is a
:class:`DatasetError` whose message names the file.
"""

from __future__ import annotations


class DatasetError(Exception):
    """Missing, unreadable or corrupt dataset files, or a bad dataset request."""
