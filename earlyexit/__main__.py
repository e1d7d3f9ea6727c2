from earlyexit.cli import main

raise SystemExit(main())
