"""``python -m services.rpc [--force]``: build the generated gRPC code now."""

import sys

from services.rpc import build

print(build(force="--force" in sys.argv))
