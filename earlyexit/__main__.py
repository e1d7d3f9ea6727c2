import os
import sys


def _end(code: int) -> None:
    """End the process with ``code``. After a Ctrl-C (130) through ``os._exit``: CPython 3.11 remembers a
    KeyboardInterrupt that left any ``exec`` of a string (dataclasses and namedtuples are made that way while
    torch and transformers import) even when it was caught, and then ends the process by SIGINT (status -2)
    instead of with the code it was given."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    raise SystemExit(code)


try:
    from earlyexit.cli import main  # imports torch: a Ctrl-C may come during it

    code = main()
except KeyboardInterrupt:
    print("\nearlyexit: interrupted", file=sys.stderr)
    code = 130
_end(code)
