"""The gRPC deployment: the coordinator (`coordinator.Coordinator`, `service.start_server`) and inference."""
