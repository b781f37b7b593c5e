from signalrl.bench.cli import main

raise SystemExit(main())
