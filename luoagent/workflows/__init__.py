"""Workflows: one module per user-visible job (doctor, update, restore, vm, lab, trace).

Each exposes ``configure(parser)`` and ``run(args) -> int`` for the CLI."""
