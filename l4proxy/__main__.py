from l4proxy.cli import main

raise SystemExit(main())
