from device_bridge.cli import main

raise SystemExit(main())
