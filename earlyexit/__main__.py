try:
    from earlyexit.cli import main  # imports torch: a Ctrl-C may come during it

    code = main()
except KeyboardInterrupt:
    import sys

    print("\nearlyexit: interrupted", file=sys.stderr)
    code = 130
raise SystemExit(code)
