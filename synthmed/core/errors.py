"""User-facing errors: one line that names the key or file and what to do."""


class PipelineError(Exception):
    """A problem with the user's inputs or params, reported without a traceback."""
