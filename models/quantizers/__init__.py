"""Quantizers. Each returns one :class:`~models.quantizers.base.QuantizerOutput` (quantized, indices, losses,
usage, probs) and has an ``indices_to_codes`` inverse; see :mod:`models.quantizers.base` for the contract.

Import the family you need from its module (``models.quantizers.soft`` for SoftVQ, ``.vq``, ``.residual`` ...);
this package module itself imports nothing heavy.
"""
