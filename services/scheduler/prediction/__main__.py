from cortex.services.scheduler.prediction.training import main

raise SystemExit(main())
