"""Register-level transports."""
