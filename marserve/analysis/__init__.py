"""Routing analyses of trained checkpoints (`marserve inspect --routing`)."""
