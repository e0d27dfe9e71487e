from shadowquant.cli import main

raise SystemExit(main())
