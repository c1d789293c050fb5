class AsftError(Exception):
    """A problem with the user's input or environment.

    The CLI prints it as one line (no traceback) and exits with code 2.
    """
