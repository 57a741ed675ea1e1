"""Layer 4: the only code that mutates objects: patch specs, the registry, reports."""
