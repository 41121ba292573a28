"""Coverage-guided fuzz targets (atheris) for the parsers that take untrusted input."""
