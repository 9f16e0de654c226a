"""Strategies (stub; being written)."""
def list_strategies():
    return ["real", "concat", "two_phase", "probabilistic"]
