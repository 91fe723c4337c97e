"""Shared test set-up: the repository root and tests/ are importable, so a test file can
`from _util import run_train, tiny_config` and `import titan_aquila` whatever directory pytest starts in.
(Kept free of torch: config and tokenizer tests stay fast.)"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for path in (TESTS, TESTS.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
