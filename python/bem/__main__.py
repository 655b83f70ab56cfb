"""``python -m bem`` is the ``bem`` command."""
from bem.cli import main

raise SystemExit(main())
