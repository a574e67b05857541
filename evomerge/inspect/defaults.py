"""The defaults the command line shows in its help, kept apart from torch so `evomerge` starts fast."""

DEFAULT_DENSITIES = (0.1, 0.3, 0.5, 0.7)  # TIES densities whose trimmed overlap and kept energy are reported
DEFAULT_ENTRIES = 65_536  # entries read per tensor: smaller tensors whole, larger ones sampled
DEFAULT_SPAN = 1_024  # contiguous entries per sampled read
