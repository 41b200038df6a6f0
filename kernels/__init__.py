"""Fused Triton kernels (installed as mlfast.kernels). They import nothing from the rest of mlfast:
launchers take plain tensors and scalars.

* ``layout``: the interleaved row layout (``peer_offsets``, ``row_width``, packed or 16-byte aligned).
* ``embedding_bag``: one-hot and multi-hot lookups of P peers in one launch.
* ``sparse_update``: the lookups' backward fused with SGD / row-wise Adagrad / lazy Adam.
* ``mutual_loss``: BCE + mutual term of all peers, the forward writes the gradient.
"""
