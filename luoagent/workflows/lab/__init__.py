"""The nested LUO lab: build an LUO kernel + Debian rootfs, boot them under QEMU, run scenarios.

Submodules: build (kernel, rootfs, guest, overlay), boot (QEMU + serial/KTAP), scenarios, cli."""
