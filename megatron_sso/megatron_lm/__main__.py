from megatron_sso.megatron_lm import main

raise SystemExit(main())
