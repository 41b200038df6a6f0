"""Reading and preparing data: the native reader and its schemas, the verified cache, hashing, the
vocabulary mode, the Criteo-format generator, the `CTRData` layout and the batch loader.

Depends on nothing else in mlfast (numpy, numba and the compiled ``mlfast._native`` only; the batch
loader also on torch)."""
