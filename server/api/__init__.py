"""gRPC front ends: decode, call the data plane, encode, map errors. Nothing else lives here."""
