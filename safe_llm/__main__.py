"""``python -m safe_llm``: the ``safe-llm`` command."""

import sys

from safe_llm.cli import main

if __name__ == "__main__":
    sys.exit(main())
