"""Small-scale reproductions of the iw-SFT paper's claims (arXiv:2507.12856)."""
