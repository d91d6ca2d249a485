"""luoagent: live-update a Linux host kernel under running QEMU VMs.

Checkpoints VMs with cpr-reboot, preserves their RAM memfds with LUO, kexecs, restores."""

__version__ = "0.1.0"
