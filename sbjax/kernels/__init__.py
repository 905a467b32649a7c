"""Pallas kernels. Files are named after their backend (``pallas_triton_*``): the Triton backend is
deprecated upstream since JAX 0.11, and a Mosaic GPU kernel can sit beside these later."""
