"""Where block devices keep their data."""
