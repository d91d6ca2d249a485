"""The nested LUO lab: build an LUO kernel + Debian rootfs, boot them under QEMU, run scenarios.

Host side: cache, debian (private apt), kernel, rootfs, guest, selftests, build (orchestration),
boot (QEMU + run disk + serial/KTAP collection), ktap, cli, demo. In the VM: runner, stage,
scenarios/ (one module per scenario)."""
