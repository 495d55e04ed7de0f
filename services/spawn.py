"""How the local launcher starts its processes: each one is the command line compose and Kubernetes run
(``python -m services.<role> ...``), either exec'd as a fresh interpreter or, by default, forked from a
zygote that imported everything once (``runtime.start_method``: ``zygote`` or ``exec``).

A node process spends about 2 s of CPU importing torch, transformers, gRPC and hffm before it does
anything; a run starts several, the test suite hundreds. With ``zygote`` the launcher's first run
starts a zygote (``python -m services.spawn``, in the run's environment), kept for its later runs
(``zygote_for``): it imports the node entry points once, then forks each process the launcher asks
for. The child becomes what ``python -m MODULE ARGS`` would be — its own session, its output to its
log, the request's environment, working directory and argv, its command line as ``ps`` shows it
(setproctitle) — and runs the module with ``runpy`` as ``python -m`` does: an uncaught exception,
``sys.exit`` and interpreter shutdown behave the same. The zygote has no threads, sockets or CUDA
state when it forks, so a child starts as clean as an exec'd one and shares the imported pages
copy-on-write.

The zygote is the children's parent: it reaps them and reports each exit to the launcher, which gets a
handle with ``subprocess.Popen``'s surface (``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``,
``terminate``, ``kill``) either way.

Protocol (JSON lines): the launcher writes ``{"argv": [...], "env": {...}, "cwd": ..., "log": ...}`` to the
zygote's stdin and reads ``{"started": pid}`` or ``{"error": message}``, and, whenever a child ends,
``{"exited": pid, "code": returncode}`` (negative: the signal that ended it). A pid is reported started only
after the child that had it before was reaped and reported, so the launcher counts a pid's incarnations and
an exit belongs to its latest one: a long benchmark wraps pid_max, and a new cloud with an exited child's pid
must not read that child's exit code (2026-12-07: it ended a run of the attack matrix at once).
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import os
import runpy
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

import setproctitle

# what the zygote imports before it forks: the node entry points and what they import while starting
PRELOAD = (
    "services.cloud.__main__",
    "services.edge.__main__",
    "services.device.__main__",
    "hffm.model",
    "transformers.models.vilt.modeling_vilt",
)


class ZygoteError(RuntimeError):
    """The zygote is gone or could not start a process (the message says why, with its log's end)."""


class Process(Protocol):
    pid: int

    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


def python_module(argv: list[str]) -> str | None:
    """The module ``argv`` runs with this interpreter (``[sys.executable, "-m", MODULE, ...]``), else None."""
    # the same path, not the same file: a virtualenv's python links to the base one and has other packages
    if len(argv) >= 3 and argv[1] == "-m" and os.path.abspath(argv[0]) == os.path.abspath(sys.executable):
        return argv[2]
    return None


class Forked:
    """A process the zygote forked, with ``subprocess.Popen``'s surface."""

    def __init__(self, zygote: Zygote, pid: int, argv: list[str], incarnation: int = 1) -> None:
        # incarnation: which of the zygote's children that had this pid it is (the kernel reuses pids)
        self._zygote, self.pid, self.args, self.incarnation = zygote, pid, argv, incarnation

    @property
    def returncode(self) -> int | None:
        return self._zygote.exit_code(self.pid, self.incarnation)

    def poll(self) -> int | None:
        return self._zygote.exit_code(self.pid, self.incarnation)

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.wait(self.pid, timeout, self.incarnation)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet: the pid is still this process's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<Forked pid={self.pid} returncode={self.returncode} args={self.args[2:3]}>"


class Zygote:
    """The launcher's side of one zygote process (started in ``env``; ``close`` ends it)."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        with open(log, "ab") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "services.spawn", str(log)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self._log = log
        self._lock = threading.Lock()  # one request at a time
        self._cond = threading.Condition()
        # (pid, incarnation) -> exit code: a pid the kernel gives to a later child is another incarnation,
        # so an earlier child's exit is never taken for a later one's (a long benchmark wraps pid_max)
        self._exits: dict[tuple[int, int], int] = {}
        self._incarnation: dict[int, int] = {}  # pid -> how many children that had it were started
        self._started: list[tuple[int, int]] = []
        self._replies: list[dict] = []
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                msg = json.loads(line)
                with self._cond:
                    # in the zygote's order: a pid is reported started only after the child that had it
                    # before was reaped and reported, so an exit is its pid's latest incarnation's
                    if "exited" in msg:
                        self._exits[(msg["exited"], self._incarnation.get(msg["exited"], 0))] = msg["code"]
                    else:
                        if "started" in msg:
                            self._incarnation[msg["started"]] = self._incarnation.get(msg["started"], 0) + 1
                        self._replies.append(msg)
                    self._cond.notify_all()
        finally:  # EOF, or a reply it cannot read: gone either way, and whoever waits is told
            with self._cond:
                self._gone = True
                self._cond.notify_all()

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Forked:
        request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}
        with self._lock:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                pass  # gone: said below
            with self._cond:
                self._cond.wait_for(lambda: self._replies or self._gone)
                if not self._replies:
                    tail = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
                    raise ZygoteError(f"the zygote ({self._log}) exited with code {self._proc.wait()}:\n{tail}")
                reply = self._replies.pop(0)
                # read with the reply: no other start can reuse the pid while this one holds the lock
                incarnation = self._incarnation.get(reply.get("started", -1), 0)
        if "error" in reply:
            raise ZygoteError(f"the zygote could not start {argv[2:3]}: {reply['error']}")
        with self._cond:
            self._started.append((reply["started"], incarnation))
        return Forked(self, reply["started"], argv, incarnation)

    def exit_code(self, pid: int, incarnation: int = 1) -> int | None:
        """The exit code of the ``incarnation``-th child with ``pid`` (None while it runs)."""
        with self._cond:
            code = self._exits.get((pid, incarnation))
            if code is None and self._gone and not os.path.exists(f"/proc/{pid}"):
                return -signal.SIGKILL  # the zygote died first; its children were reaped by init, codes unknown
            return code

    def wait(self, pid: int, timeout: float | None, incarnation: int = 1) -> int | None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.exit_code(pid, incarnation) is None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(0.2 if left is None else min(left, 0.2))
            return self.exit_code(pid, incarnation)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        with self._cond:
            return not self._gone and self._proc.poll() is None

    def idle(self) -> bool:
        """No process it started is still running."""
        with self._cond:
            return all(started in self._exits for started in self._started)

    def close(self) -> None:
        """End the zygote (the processes it started are the launcher's to stop, and already are)."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()  # EOF: it exits
            except BrokenPipeError:
                pass
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(5)
        try:
            if self._log.stat().st_size == 0:  # nothing to tell: no file left behind
                self._log.unlink()
        except OSError:
            pass


PER_RUN_ENV = ("HFFM_RUN_ID", "HFFM_RUN_STARTED", "HFFM_FAILPOINTS")  # each request carries its own
_SHARED: dict[tuple, Zygote] = {}
_SHARED_LOCK = threading.Lock()


def zygote_for(env: dict[str, str], cwd: Path) -> Zygote:
    """This process's zygote for ``env`` (less what differs from run to run, ``PER_RUN_ENV``): started at
    the first run and kept for the next ones (a test session, a benchmark of many runs: one import for
    all of them); a new one when it died or the environment differs. Zygotes of another environment
    that no longer run anything are ended; the rest end with this process (``atexit``, and the EOF on
    their request pipe when it dies)."""
    base = {k: v for k, v in env.items() if k not in PER_RUN_ENV}
    key = (str(cwd), tuple(sorted(base.items())))
    with _SHARED_LOCK:
        for k, z in list(_SHARED.items()):
            if not z.alive() or (k != key and z.idle()):
                z.close()
                del _SHARED[k]
        if key not in _SHARED:
            log = Path(tempfile.gettempdir()) / f"hffm-zygote-{os.getpid()}-{len(_SHARED)}.log"
            _SHARED[key] = Zygote(base, cwd, log)
        return _SHARED[key]


def zygotes() -> list[Zygote]:
    """This process's zygotes (``zygote_for``)."""
    with _SHARED_LOCK:
        return list(_SHARED.values())


@atexit.register
def close_zygotes() -> None:
    with _SHARED_LOCK:
        for z in _SHARED.values():
            z.close()
        _SHARED.clear()


def start(
    argv: list[str],
    log: Path,
    env: dict[str, str],
    cwd: Path,
    zygote: Zygote | None = None,
    append: bool = True,
) -> Process:
    """Start ``argv`` with both output streams to ``log`` (appended, or truncated first when not
    ``append``): forked by ``zygote`` when given and ``argv`` runs a module with this interpreter,
    else exec'd."""
    if not append:
        log.write_bytes(b"")
    if zygote is not None and python_module(argv) is not None:
        return zygote.start(argv, env, cwd, log)
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


# --- the zygote process ------------------------------------------------------------------------------


def _serve(requests: io.RawIOBase, replies: io.TextIOBase, devnull: int, log: str | None) -> dict:
    """The zygote's loop: fork a child per request, report exits; return the request in a child. It ends
    when the launcher closes its request pipe or stops reading (it is gone), removing its ``log`` when empty
    (nothing went wrong: no file left behind, even when the launcher died without closing it)."""

    def leave() -> None:
        try:
            if log and os.path.getsize(log) == 0:
                os.unlink(log)
        except OSError:
            pass
        os._exit(0)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector
    sel = selectors.DefaultSelector()
    sel.register(requests, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: set[int] = set()
    pending = b""

    def say(msg: dict) -> None:
        try:
            replies.write(json.dumps(msg) + "\n")
        except OSError:  # the launcher is gone (a broken pipe): so is the zygote's work
            leave()

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    while True:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 4096)
                reap()
                continue
            chunk = requests.read(65536)
            if not chunk:  # the launcher closed the pipe (or is gone): the zygote's work is done
                reap()
                leave()
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    pid = os.fork()
                except (ValueError, OSError) as err:
                    say({"error": f"{type(err).__name__}: {err}"})
                    continue
                if pid == 0:  # the child: leave the zygote behind
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    sel.close()
                    for fd in (wake_r, wake_w, devnull):
                        os.close(fd)
                    replies.close()
                    requests.close()
                    return request
                children.add(pid)
                say({"started": pid})
        reap()


def _become(request: dict) -> None:
    """In a forked child: become ``python -m MODULE ARGS`` as the request says, then run it."""
    os.setsid()  # its own session and process group (start_new_session); stdin is /dev/null
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]
    setproctitle.setproctitle(" ".join(argv))  # ps, pkill -f and /proc/PID/cmdline show its command line
    module = argv[2]
    sys.argv = [module, *argv[3:]]
    # what the zygote imported runs afresh as __main__ (python -m leaves it out of sys.modules)
    if not hasattr(sys.modules.get(module), "__path__"):
        sys.modules.pop(module, None)
    sys.modules.pop(module + ".__main__", None)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main() -> None:
    # the request and reply pipes on fds of their own; stdin and stdout /dev/null, so that nothing printed
    # (by an import, say) mixes with the replies
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    setproctitle.setproctitle(setproctitle.getproctitle())  # set up now, while the environment is the process's own
    # a CUDA check while importing must not initialise the driver (NVML answers it), or no child could use it
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in PRELOAD:
        __import__(name)
    import torch

    if torch.cuda.is_initialized():  # a child forked now could not initialise CUDA itself
        sys.exit("services.spawn: importing the nodes initialised CUDA; use runtime.start_method: exec")
    gc.collect()
    gc.freeze()  # what the children share: the collector never writes to those pages
    request = _serve(requests, replies, devnull, sys.argv[1] if len(sys.argv) > 1 else None)
    _become(request)


if __name__ == "__main__":
    main()
