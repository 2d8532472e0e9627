"""google.longrunning.Operations over the same jobs as tensorgate.v1's job RPCs, so generic
Operations clients (and grpcurl) follow them.

An operation is named `jobs/<job_id>`; its `metadata` packs a tensorgate.v1.JobMetadata (model,
status, attempts, times, webhook delivery); once done, `response` packs the PredictResponse or
`error` holds the google.rpc.Status. ListOperations is the caller's tenant's jobs, newest first,
filtered by `status = "SUCCEEDED"` (any JobStatus name), paged by an opaque token. Cancel cancels
the job; Delete forgets a finished one; Wait long-polls like GetResult.
"""

from __future__ import annotations

import base64
import binascii
import re

from google.longrunning import operations_proto_pb2 as lro
from google.protobuf import empty_pb2
from google.rpc import status_pb2

from tensorgate.server.api.frontend import Frontend
from tensorgate.server.api.servicer import predict_response, webhook_delivery
from tensorgate.server.api.status import MAX_MESSAGE_CHARS, status_of
from tensorgate.server.api.unary import Call, rpc
from tensorgate.server.errors import InvalidArgument, clip
from tensorgate.server.records import Cursor, JobStatus, JobView
from tensorgate.v1 import inference_pb2 as pb

SERVICE = "google.longrunning.Operations"
_PREFIX = "jobs/"
_DEFAULT_PAGE = 50
_MAX_PAGE = 1000
_FILTER = re.compile(r'\s*status\s*=\s*"?([A-Za-z_]+)"?\s*')


class OperationsServicer:
    SERVICE = SERVICE

    def __init__(self, frontend: Frontend, max_wait_s: float) -> None:
        self.frontend = frontend
        self._plane = frontend.plane
        self._max_wait_s = max_wait_s

    @rpc()
    async def GetOperation(self, request: lro.GetOperationRequest, call: Call) -> lro.Operation:
        return operation(await self._plane.job(_job_id(request.name), call.tenant))

    @rpc()
    async def ListOperations(
        self, request: lro.ListOperationsRequest, call: Call
    ) -> lro.ListOperationsResponse:
        if request.name not in ("", "jobs"):
            raise InvalidArgument(
                f"name {request.name[:100]!r}: operations are listed under 'jobs'"
            )
        if not 0 <= request.page_size <= _MAX_PAGE:
            raise InvalidArgument(f"page_size must be between 0 and {_MAX_PAGE}")
        size = request.page_size or _DEFAULT_PAGE
        after = _cursor(request.page_token) if request.page_token else None
        # One more than the page: whether there is a next page.
        jobs = await self._plane.list_jobs(_status(request.filter), size + 1, call.tenant, after)
        page = jobs[:size]
        response = lro.ListOperationsResponse(operations=[operation(job) for job in page])
        if len(jobs) > size:
            response.next_page_token = _token((page[-1].created_at, page[-1].id))
        return response

    @rpc()
    async def CancelOperation(
        self, request: lro.CancelOperationRequest, call: Call
    ) -> empty_pb2.Empty:
        await self._plane.cancel_job(_job_id(request.name), call.tenant)
        return empty_pb2.Empty()

    @rpc()
    async def DeleteOperation(
        self, request: lro.DeleteOperationRequest, call: Call
    ) -> empty_pb2.Empty:
        await self._plane.delete_job(_job_id(request.name), call.tenant)
        return empty_pb2.Empty()

    @rpc()
    async def WaitOperation(self, request: lro.WaitOperationRequest, call: Call) -> lro.Operation:
        """Waits up to the timeout (the server's longest long-poll when unset) for the job to
        finish, and returns it as it then is."""
        wait_s = self._max_wait_s
        if request.HasField("timeout"):
            wait_s = max(request.timeout.ToTimedelta().total_seconds(), 0.0)
        job = await self._plane.job(_job_id(request.name), call.tenant, wait_s=wait_s)
        return operation(job)


def operation(job: JobView) -> lro.Operation:
    """A job as an Operation."""
    message = lro.Operation(name=_PREFIX + job.id, done=job.status.finished)
    metadata = pb.JobMetadata(
        job_id=job.id,
        model=job.model,
        status=job.status.value,
        attempts=job.attempts,
        request_id=job.request_id,
        delivery=webhook_delivery(job.delivery),
    )
    metadata.create_time.FromNanoseconds(int(job.created_at * 1e9))
    if job.started_at is not None:
        metadata.start_time.FromNanoseconds(int(job.started_at * 1e9))
    if job.finished_at is not None:
        metadata.end_time.FromNanoseconds(int(job.finished_at * 1e9))
    message.metadata.Pack(metadata)
    if job.status is JobStatus.SUCCEEDED and job.outputs is not None:
        message.response.Pack(predict_response(job.model, job.request_id, job.outputs))
    elif job.error is not None and job.status.finished:
        message.error.CopyFrom(
            status_pb2.Status(
                code=status_of(job.error).value[0], message=clip(job.error, MAX_MESSAGE_CHARS)
            )
        )
    return message


def _job_id(name: str) -> str:
    if not name.startswith(_PREFIX):
        raise InvalidArgument(f"operation name {name[:100]!r} must be jobs/<job_id>")
    return name[len(_PREFIX) :]


def _status(text: str) -> JobStatus | None:
    if not text.strip():
        return None
    match = _FILTER.fullmatch(text)
    names = ", ".join(s.value for s in JobStatus)
    if match is None or match.group(1).upper() not in JobStatus.__members__:
        raise InvalidArgument(
            f"filter {text[:100]!r}: only status = NAME is supported, NAME one of {names}"
        )
    return JobStatus[match.group(1).upper()]


def _token(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(f"{cursor[0]!r}:{cursor[1]}".encode()).decode()


def _cursor(token: str) -> Cursor:
    try:
        created, _, job_id = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        return float(created), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not one this server gave") from None
