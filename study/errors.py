"""The base class of errors a user can act on (bad config, missing folder, stale cache, missing weights).

``run_study.py`` prints such an error's message and exits with status 2 instead of a traceback;
anything else is a bug and keeps its traceback.
"""


class StudyError(Exception):
    """An error whose message says what is wrong, where, and what to do."""
