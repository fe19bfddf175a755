"""The local training corpus builder and its committed held-out slices."""
