"""Pure, jittable step functions: no I/O and no jit here; the programs compile them."""
