from megatron_sso.cli.main import main

raise SystemExit(main())
