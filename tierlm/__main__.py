"""``python -m tierlm``: the same command as ``tierlm``."""

from tierlm.cli import main

raise SystemExit(main())
