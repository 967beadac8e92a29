"""capaserve serving: the engine (no Ray), the scheduler, the HTTP API and the Ray Serve app."""
