"""``python -m pipeline`` is the ``fedex`` command (used by ``fedex up`` for its children)."""

from pipeline.cli import main

main()
