"""`python -m miren_ingress`: the `miren` command (see miren_ingress.shell.cli)."""

from miren_ingress.shell.cli import main

raise SystemExit(main())
