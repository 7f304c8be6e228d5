"""The exceptions that end a command with one sentence and a documented exit code, never a traceback.

- `UserError`: a mistake in the user's own input (config values, data, checkpoints, a busy run directory):
  exit code 2. Raise it early, before compiling or loading anything large.
- `StorageError`: the file system refused a read or write (disk full, read-only or vanished folder,
  permissions): exit code 74 (EX_IOERR). `storage_error` recognises one in an OSError, or in the
  ValueError by which TensorStore (under Orbax) reports an OS error.
- `Interrupted`: SIGTERM / SIGINT outside the training loop (start-up, the final evaluation): exit code
  128 + the signal's number, like the loop's own stop.

Entry points catch them (`cvae_exp.cli.exit_on_user_error`) and print the message on stderr.
"""

from __future__ import annotations

import errno
import os
import re

STORAGE_EXIT_CODE = 74  # EX_IOERR in sysexits.h: "an error occurred while doing I/O on some file"
# The OS errors that mean the file system refused (network and other OSErrors are not reported as such).
_FS_ERRNOS = {
    getattr(errno, name)
    for name in "ENOSPC EDQUOT EFBIG EROFS EACCES EPERM ENOENT ENOTDIR EISDIR EEXIST ENOTEMPTY EIO ENAMETOOLONG "
    "EMFILE ENFILE EXDEV ESTALE EBUSY ETXTBSY ELOOP".split()
    if hasattr(errno, name)
}


class UserError(Exception):
    """A problem with the user's input; the message names the key, value or file."""


class StorageError(Exception):
    """The file system refused an operation; the message names the path and the OS error."""


class Interrupted(BaseException):
    """A stop signal where the run cannot checkpoint and go on; `message` says what was (not) trained.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message


# TensorStore: 'Failed writing: "<path>": Failed to write 269953 bytes to file 4: File too large [os_error_code='27']'
_TS_PATH = re.compile(r'(?:writing|reading|opening|creating|deleting|renaming|file)\W+"([^"]+)"', re.IGNORECASE)
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")


def storage_error(err: BaseException) -> StorageError | None:
    """`err` as one sentence naming the path and the OS error, or None when it is not a file-system failure."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, OSError) and err.errno in _FS_ERRNOS:
        paths = [p for p in (err.filename, err.filename2) if p]
        where = " -> ".join(map(str, paths)) or "a file of the run"
        return StorageError(f"The file system refused {where}: {_describe(err.errno)}.")
    text = str(err)
    code = _TS_ERRNO.search(text)
    if code and int(code.group(1)) in _FS_ERRNOS:  # TensorStore (under Orbax) reports OS errors as text
        # the last absolute path it names: its spec, also in the text, quotes JSON keys after "file" too
        path = [p for p in _TS_PATH.findall(text) if os.path.isabs(p)]
        where = path[-1] if path else "a checkpoint file"
        return StorageError(f"The file system refused {where}: {_describe(int(code.group(1)))}.")
    cause = err.__cause__  # `raise ... from` an OSError (an implicit context may be unrelated)
    return storage_error(cause) if cause is not None else None


def _describe(code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code)} ({name})"
