from residlab.cli import main

raise SystemExit(main())
