"""``python -m export`` = ``tts-export``."""
import sys

from export.cli import main

sys.exit(main())
