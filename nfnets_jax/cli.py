"""Running a command-line entry point: absl's `app.run`, with the errors a user can act on
(a bad flag value, a missing file, a damaged checkpoint, a diverged run) printed as their
message after `error: ` (one line, or a few for messages that list steps or fields) instead
of a traceback. `NFNETS_TRACEBACK=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app

# Our own errors derive from these: ValueError (configs, checkpoints, datasets), OSError
# (missing files, unreadable checkpoints, checksums), FloatingPointError (a diverged run).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def run(main: Callable[[list[str]], Any]) -> None:
    """`app.run(main)`; a `USER_ERRORS` exception ends the program with status 1 and one line
    `error: <message>` on stderr."""

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except USER_ERRORS as err:
            if os.environ.get("NFNETS_TRACEBACK"):
                raise
            print(f"error: {err}", file=sys.stderr)
            print("(NFNETS_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # Without interpreter teardown: no background-thread noise after it.

    app.run(guarded)
