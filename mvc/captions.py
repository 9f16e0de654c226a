"""Captioners (stub; being written)."""
def list_captioners():
    return ["blip2", "lavis", "attributes", "template"]
