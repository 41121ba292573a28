"""vhost-user: devices served to QEMU and any other vhost-user front-end over a UNIX socket."""
