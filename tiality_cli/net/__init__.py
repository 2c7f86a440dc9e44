"""The wire: gRPC and the generated protobuf code (the only user of grpc)."""
