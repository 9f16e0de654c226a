"""Mixing (stub; being written)."""
def list_mixing_ops():
    return ["none", "coarse", "fine"]
