"""The vhost-user protocol (QEMU docs/interop/vhost-user.rst): its messages and how they
travel, shared by the front-end (``driver``) and the back-end (``shims.vhost_user``)."""
