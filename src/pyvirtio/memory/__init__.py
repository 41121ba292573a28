"""Guest memory as a backend sees it, and the barriers that order accesses to it."""
