"""A process for tests/test_spawn.py: it reports what it is (``python -m tests.spawn_child ACTION``), so a
process the zygote forked can be compared with one exec'd from the same command line."""

import atexit
import json
import os
import signal
import sys
import time

action = sys.argv[1] if len(sys.argv) > 1 else "report"
atexit.register(lambda: print("atexit ran", flush=True))
print(
    json.dumps(
        {
            "name": __name__,
            "argv": [os.path.relpath(sys.argv[0]), *sys.argv[1:]],
            "cwd": os.getcwd(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("SPAWN_TEST")},
            "own_session": os.getsid(0) == os.getpid() == os.getpgid(0),
            "stdin": sys.stdin.read(),
            "main_loaded": "tests.spawn_child" in sys.modules,
            "cmdline": open("/proc/self/cmdline", "rb").read().replace(b"\0", b" ").decode().strip(),
        }
    )
)
print("to stderr", file=sys.stderr)
if action == "raise":
    raise RuntimeError("the child failed")
if action == "exit3":
    sys.exit(3)
if action == "exitmsg":
    sys.exit("a message from sys.exit")
if action == "killself":
    os.kill(os.getpid(), signal.SIGKILL)
if action == "sleep":
    time.sleep(60)
