from shoal._cli import main

raise SystemExit(main())
