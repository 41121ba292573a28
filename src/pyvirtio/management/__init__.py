"""Managing a running daemon: a control socket with QMP-shaped JSON commands, metrics in
Prometheus' text format, and readiness for systemd."""
