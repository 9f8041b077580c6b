"""Running an engine as a service: its own thread (EngineLoop) and its own process (EngineProcess)."""
