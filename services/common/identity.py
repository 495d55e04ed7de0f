"""Who is calling: the one place the receive path learns the caller's identity from the transport.

``peer_identity(context)`` is what every servicer asks; nothing reads an identity from a message
field. Today the caller's client names its node in the call's metadata (``identity_metadata``), which
is as trusted as the network; the trust issue replaces this function's body with the node id in the
verified mTLS client certificate (``context.auth_context()``), and no caller of it changes.
"""

from __future__ import annotations

import grpc

IDENTITY_KEY = "x-hffm-node"


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The calling node's id, or None when the caller did not identify itself."""
    for key, value in context.invocation_metadata() or ():
        if key == IDENTITY_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


def identity_metadata(node_id: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that identifies the calling node (``peer_identity`` reads it)."""
    return ((IDENTITY_KEY, node_id),)
