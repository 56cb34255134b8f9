from apr_kernels.cli import main

raise SystemExit(main())
