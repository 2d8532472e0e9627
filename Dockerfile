# tensorgate on the CPU (ONNX Runtime backend), serving the bundled model on port 50051.
#   docker build -t tensorgate .
#   docker run --rm -p 50051:50051 tensorgate
# Mount your own repository with -v $PWD/engines:/app/engines. Configure with TENSORGATE_* and
# OTEL_* environment variables (see README).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md build_engines.py ./
COPY protos protos
COPY server server
COPY client client
COPY tensorgate_cli tensorgate_cli
COPY engines engines
RUN pip install --no-cache-dir . \
 && python build_engines.py \
 && useradd --system --uid 10001 --no-create-home tensorgate

USER tensorgate
# gRPC, and the Prometheus metrics endpoint.
EXPOSE 50051 8002
ENV TENSORGATE_MODEL_REPOSITORY=/app/engines
ENTRYPOINT ["tensorgate"]
CMD ["serve"]
