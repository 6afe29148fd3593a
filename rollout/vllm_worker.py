"""What vespo adds to every vLLM worker (`worker_extension_cls`), called through collective_rpc:
the receiving side of the weight sync, and the capture of MoE routing where vLLM cannot return it."""

from __future__ import annotations

from rollout.routing_capture import RoutingCapture
from weightsync.receiver import VespoWorkerExtension


class VespoWorker(VespoWorkerExtension, RoutingCapture):
    pass
