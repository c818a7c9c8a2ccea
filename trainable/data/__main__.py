"""``python -m trainable.data verify``: compare a folder with UrbanSound8K (see ``metadata.py``)."""

from .metadata import main

raise SystemExit(main())
