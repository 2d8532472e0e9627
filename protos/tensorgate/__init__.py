"""tensorgate: a gRPC inference server for TensorRT engines, with ONNX Runtime as the CPU default.

    tensorgate.server   the server (python -m tensorgate serve)
    tensorgate.client   sync and asyncio clients: from tensorgate.client import TensorgateClient
    tensorgate.command  the `tensorgate` command
    tensorgate.v1       the generated tensorgate.v1 protocol; tensorgate.kserve: KServe v2's

In a checkout the server and client live in the top-level folders server/ and client/ (linked
into this package); the wheel installs them here.
"""
