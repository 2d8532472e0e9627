"""Python clients for tensorgate: numpy arrays in, numpy arrays out.

from tensorgate.client import TensorgateClient
with TensorgateClient("localhost:50051") as c:
    outputs = c.predict("mlp", {"input": x})
"""

from tensorgate.client.aio import AsyncTensorgateClient
from tensorgate.client.codec import (
    JobResult,
    JobSummary,
    Security,
    StreamItem,
    StreamResult,
    Submitted,
)
from tensorgate.client.sequences import SequenceError, SequenceStream
from tensorgate.client.sync import TensorgateClient

__all__ = [
    "AsyncTensorgateClient",
    "JobResult",
    "JobSummary",
    "Security",
    "SequenceError",
    "SequenceStream",
    "StreamItem",
    "StreamResult",
    "Submitted",
    "TensorgateClient",
]
