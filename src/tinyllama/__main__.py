from tinyllama.cli import main

raise SystemExit(main())
