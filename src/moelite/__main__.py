from moelite.apps.cli import main

raise SystemExit(main())
