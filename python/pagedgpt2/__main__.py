from pagedgpt2.cli import main

raise SystemExit(main())
