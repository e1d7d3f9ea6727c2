"""Run several ``earlyexit`` commands one after the other in ONE ``accelerate launch`` group (the arguments of
each command separated by ``:::``), so that a test pays for starting the processes once. Each command runs
exactly as ``accelerate launch -m earlyexit <command>`` runs it. Used by tests/test_parallel.py."""
import sys

if __name__ == "__main__":
    from earlyexit.cli import main

    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == ":::":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for args in commands:
        code = main(args)
        if code:
            sys.exit(code)
