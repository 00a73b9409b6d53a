"""A variant's engine: its Serve deployment (server), the hardware probe, the kernel report, the verification."""
