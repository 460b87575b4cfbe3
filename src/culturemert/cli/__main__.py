"""``python -m culturemert.cli ...`` (also what ``torchrun -m culturemert.cli pretrain ...`` runs)."""

from culturemert.cli import main

raise SystemExit(main())
