"""Project exceptions: each carries one line that names the file or field at fault."""


class HLFDError(Exception):
    """Root of every error the runtime reports to a user (CLI: one line, exit code 1)."""


class ModelError(HLFDError):
    """A model package or registry entry is missing, invalid, tampered with or unsafe."""


class InputError(HLFDError):
    """An input image cannot be segmented (unreadable, wrong dimensionality, bad values)."""
