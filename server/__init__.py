"""tensorgate server: gRPC front ends over one batching data plane (see server/app.py)."""
