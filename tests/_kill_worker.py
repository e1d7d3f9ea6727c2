"""Run the ``earlyexit`` command line in an ``accelerate launch`` group, with process 1 killed (SIGKILL, no
clean-up of any kind) when it starts its second MC question. Used by tests/test_parallel.py."""
import os
import signal
import sys

if __name__ == "__main__":
    from earlyexit.core import parallel

    if parallel.process_index() == 1:
        import earlyexit.studies.mc as mc

        real, calls = mc.question_raw, []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        mc.question_raw = dying
    from earlyexit.cli import main

    sys.exit(main(sys.argv[1:]))
