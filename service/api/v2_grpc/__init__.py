"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, Triton's proto as
`tritonclient.grpc` ships it): the servicer, its streaming half, and the server's life."""
