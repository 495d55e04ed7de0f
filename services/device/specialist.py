"""A device's part in choosing specialists (Section V-C; hffm/specialists.py): it serves its modules
for a task to the cloud, and scores another node's modules for a task on its own test data. Only the
cloud may call either; a rejected call changes nothing on the device."""

from __future__ import annotations

from hffm.modules import encode_modules
from services.common.convert import blobs_from_pb, blobs_to_pb
from services.common.node import abort_for, authorize, from_coordinator
from services.device.node import DeviceNode
from services.rpc import pb, pb_grpc


class SpecialistServicer(pb_grpc.SpecialistServicer):
    def __init__(self, node: DeviceNode) -> None:
        self.node = node

    def Serve(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "Serve", from_coordinator)
            mods = self.node.task_modules(request.task)
            wire = self.node.cfg.wire
            # as a relay would encode them (the wire's dtype and digest): the cloud pins that digest
            encoded = encode_modules([mods[n] for n in sorted(mods)], wire.dtype, digest_alg=wire.digest)
            return pb.ServedModules(modules=blobs_to_pb(encoded))
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)

    def Validate(self, request, context):  # noqa: N802
        try:
            authorize(self.node, context, "Validate", from_coordinator)
            mods = blobs_from_pb(request.modules, self.node.spec)
            acc, own, samples, classes = self.node.validate(request.task, mods, request.provider)
            return pb.ValidationScore(accuracy=acc, own_accuracy=own, samples=samples, classes=classes)
        except Exception as err:  # noqa: BLE001
            abort_for(context, err)


def extra(node: DeviceNode):
    """The ``NodeServer`` extra for a device's Specialist service."""
    return (pb_grpc.add_SpecialistServicer_to_server, SpecialistServicer(node), "Specialist")
