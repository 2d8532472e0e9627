"""Python clients for tensorgate: numpy arrays in, numpy arrays out.

    from tensorgate.client import TensorgateClient
    with TensorgateClient("localhost:50051") as c:
        outputs = c.predict("mlp", {"input": x})

Every failure is a TensorgateError (code, message, retry_after_s); Retry() makes a client run
calls the server refuses again, honouring its retry-after hint.
"""

from tensorgate.client.aio import AsyncTensorgateClient
from tensorgate.client.errors import Retry, TensorgateError
from tensorgate.client.results import (
    Delivery,
    JobEvent,
    JobResult,
    JobSummary,
    ModelMetadata,
    ModelSummary,
    RepositoryModel,
    StreamItem,
    StreamResult,
    Submitted,
    TensorMetadata,
)
from tensorgate.client.security import Security
from tensorgate.client.sequences import SequenceError, SequenceStream
from tensorgate.client.sync import TensorgateClient

__all__ = [
    "AsyncTensorgateClient",
    "Delivery",
    "JobEvent",
    "JobResult",
    "JobSummary",
    "ModelMetadata",
    "ModelSummary",
    "RepositoryModel",
    "Retry",
    "Security",
    "SequenceError",
    "SequenceStream",
    "StreamItem",
    "StreamResult",
    "Submitted",
    "TensorMetadata",
    "TensorgateClient",
    "TensorgateError",
]
