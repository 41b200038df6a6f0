"""The training ops' front ends: one autograd Function per op (embedding lookup of one-hot ids and
bags, sparse optimizer update, mutual loss), their plain-PyTorch references and the numba CPU
backends, with the backend of each op chosen through one dispatch table (`mlfast.ops.backends`).

Depends on torch, numba and ``mlfast.kernels`` (Triton, imported only when a Triton backend runs)."""
