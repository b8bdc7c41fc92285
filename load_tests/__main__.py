"""``python -m load_tests SCENARIO --base-url URL ...`` (same as ``mistral-serve load``)."""
import sys

from .cli import main

sys.exit(main())
