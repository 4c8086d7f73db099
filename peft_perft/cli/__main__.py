"""``python -m peft_perft.cli``: the ``peft-perft`` command without its console script."""

from . import main

raise SystemExit(main())
