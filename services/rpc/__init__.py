"""gRPC code generated from ``proto/hffm.proto`` (never hand-edited, never committed).

Built on first import when missing or older than the .proto (``python -m services.rpc`` builds it
explicitly; images build it at image build time). The build writes to a temporary directory and
renames it into place, so processes starting together cannot see a half-written package.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_GEN = _HERE / "_gen"
_PROTO = _HERE.parent.parent / "proto" / "hffm.proto"


def _stale() -> bool:
    target = _GEN / "hffm_pb2_grpc.py"
    if not target.exists():
        return True
    return _PROTO.exists() and _PROTO.stat().st_mtime > target.stat().st_mtime


def build(force: bool = False) -> Path:
    if not force and not _stale():
        return _GEN
    if not _PROTO.exists():
        raise RuntimeError(f"generated gRPC code missing and {_PROTO} not found")
    from grpc_tools import protoc

    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=_HERE))
    try:
        args = [
            "protoc",
            f"-I{_PROTO.parent}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(_PROTO),
        ]
        import grpc_tools

        args.insert(1, f"-I{Path(grpc_tools.__file__).parent / '_proto'}")
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {_PROTO}")
        grpc_file = tmp / "hffm_pb2_grpc.py"
        # protoc emits a top-level import; make it package-relative.
        text = re.sub(r"^import hffm_pb2 as", "from . import hffm_pb2 as", grpc_file.read_text(), flags=re.M)
        grpc_file.write_text(text)
        (tmp / "__init__.py").write_text('"""Generated from proto/hffm.proto; do not edit."""\n')
        old = None
        if _GEN.exists():
            old = _HERE / f"_gen.old.{os.getpid()}"
            try:
                _GEN.rename(old)
            except OSError:
                old = None
        try:
            tmp.rename(_GEN)
        except OSError:
            if not _GEN.exists():  # lost a race with another process only if it produced the package
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _GEN


build()
from services.rpc._gen import hffm_pb2 as pb  # noqa: E402
from services.rpc._gen import hffm_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc", "build"]

if __name__ == "__main__":  # pragma: no cover
    print(build(force="--force" in sys.argv))
