"""Adapters: one module per outside thing (LUO, memfd, QEMU, kexec), no policy.

Adapters never import workflows; data flows cli -> workflows -> adapters -> csrc shim."""
