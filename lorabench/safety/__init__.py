"""Output that is never half-written and never touches what lorabench did not make; signal handling."""
