"""Errors the CLI turns into exit codes.

UsageError: the input is wrong (file, spec, option); the CLI prints one line and exits 2.
ValidationFailed: the run worked but results disagree beyond tolerance; exit 1 with the report.
"""


class UsageError(Exception):
    """Bad input. The message says what is wrong and what to do, in one line."""


class NotAvailableYet(UsageError):
    """A command or option that tcexport documents but does not implement yet."""


class ValidationFailed(Exception):
    """Outputs disagree beyond tolerance. Carries the report that shows by how much."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
