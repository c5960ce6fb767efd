"""Neural network modules of Spectron: speech encoder, prefix decoder, acoustic heads and their assembly."""
