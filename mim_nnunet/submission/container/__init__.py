"""Container entry point for challenges that run submissions as Docker images (see Dockerfile beside it)."""
