"""Moving the trainer's weights into rollout engines: export, transports, checksums."""
