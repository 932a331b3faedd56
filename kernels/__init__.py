"""visattn.kernels: the block-sparse attention backbone (layouts, backends, dispatcher)."""
from .layout import BlockLayout, MaskMod, pack_bits, unpack_bits
from .reference import masked_attention, expand_kv_heads
from .dispatch import Backend, available_backends, block_sparse_attention, check_backend_name, register_backend

__all__ = [
    "BlockLayout", "MaskMod", "pack_bits", "unpack_bits",
    "masked_attention", "expand_kv_heads",
    "Backend", "available_backends", "block_sparse_attention", "check_backend_name", "register_backend",
]
