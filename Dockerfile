# tensorgate, serving the bundled models on port 50051 (metrics on 8002).
#   docker build -t tensorgate .                                   # CPU: ONNX Runtime
#   docker run --rm -p 50051:50051 -p 8002:8002 tensorgate
#   docker build --build-arg EXTRAS=gpu -t tensorgate:gpu .        # + TensorRT lean runtime, CuPy
#   docker run --rm --gpus all -p 50051:50051 tensorgate:gpu
# The GPU image takes CUDA, TensorRT and CuPy from their pip wheels; the NVIDIA driver comes from
# the host (NVIDIA Container Toolkit, --gpus). BASE swaps the base image (a CUDA or TensorRT one
# with Python >= 3.11). Mount your own repository with -v $PWD/engines:/app/engines. Configure
# with TENSORGATE_* and OTEL_* environment variables (see README).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=""

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md constraints.txt ./
COPY protos protos
COPY server server
COPY client client
COPY command command
RUN pip install --no-cache-dir -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
 && tensorgate build --out /app/engines \
 && useradd --system --uid 10001 --no-create-home tensorgate

USER tensorgate
# gRPC, and the Prometheus metrics endpoint.
EXPOSE 50051 8002
ENV TENSORGATE_MODEL_REPOSITORY=/app/engines
# The server's own health service (SERVING once every model is loaded and warm).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["tensorgate", "health", "--target", "localhost:50051", "--timeout-s", "4"]
ENTRYPOINT ["tensorgate"]
CMD ["serve"]
