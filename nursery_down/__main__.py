"""``python -m nursery_down``: the same as the ``nursery-down`` command."""

from ._cli import main

raise SystemExit(main())
