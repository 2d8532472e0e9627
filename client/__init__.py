"""Python clients for tensorgate: numpy arrays in, numpy arrays out.

from client import TensorgateClient
with TensorgateClient("localhost:50051") as c:
    outputs = c.predict("mlp", {"input": x})
"""

from client.aio import AsyncTensorgateClient
from client.codec import JobResult, JobSummary, Security, StreamItem, StreamResult, Submitted
from client.sequences import SequenceError, SequenceStream
from client.sync import TensorgateClient

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
