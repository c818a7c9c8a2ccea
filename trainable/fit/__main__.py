"""``python -m trainable.fit``: one fold with one config, without Ray (see ``local.py``)."""

from .local import main

raise SystemExit(main())
